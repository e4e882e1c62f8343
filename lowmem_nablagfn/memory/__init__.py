"""The memory plan in one place: the update's passes as data (:mod:`.plan`), one executor that runs
them (:mod:`.executor`) on plain callables (:mod:`.passes`), the rows it trains on (:mod:`.rows`) and
the fp16 loss scale of its backward passes (:mod:`.scaler`)."""
from .executor import accumulate_gradients
from .passes import (Detached, ObjectiveSettings, UpdateContext, UpdateFns, reference_scores, reward_grad_at,
                     train_pass)
from .plan import PHASES, MemoryPlan, Phase, Placement, build_plan
from .rows import Rows
from .scaler import LossScaler

__all__ = ["PHASES", "Detached", "LossScaler", "MemoryPlan", "ObjectiveSettings", "Phase", "Placement", "Rows",
           "UpdateContext", "UpdateFns", "accumulate_gradients", "build_plan", "reference_scores", "reward_grad_at",
           "train_pass"]
