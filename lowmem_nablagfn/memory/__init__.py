"""The memory plan in one place: the update's passes as data (:mod:`.plan`), one executor that runs
them (:mod:`.executor`) on plain callables (:mod:`.passes`), the rows it trains on (:mod:`.rows`) and
the fp16 loss scale of its backward passes (:mod:`.scaler`)."""
from .executor import accumulate_gradients
from .passes import (Detached, ObjectiveSettings, UpdateContext, UpdateFns, reference_scores, reward_grad_at,
                     train_pass)
from .plan import (MONITOR_PHASE, OFFICIAL, PHASES, SAMPLING_PHASES, STEP_PHASE, Batches, MemoryPlan, Mode, Phase, Placement, build_plan,
                   official_memory)
from .rows import Rows
from .scaler import LossScaler

__all__ = ["MONITOR_PHASE", "OFFICIAL", "PHASES", "SAMPLING_PHASES", "STEP_PHASE", "Batches", "Detached", "LossScaler", "MemoryPlan",
           "Mode", "ObjectiveSettings", "Phase", "Placement", "Rows", "UpdateContext", "UpdateFns",
           "accumulate_gradients", "build_plan", "official_memory", "reference_scores", "reward_grad_at", "train_pass"]
