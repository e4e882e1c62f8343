"""Worker of tests/test_distributed.py, run as ``torchrun --nproc_per_node=2 tests/dist_worker.py MODE OUT``
(or imported, for the single-process reference).  Not collected by pytest (no ``test_`` prefix).

``equivalence``: every rank samples the same ``TOTAL`` trajectories from fixed, rank-free seeds and
trains on its own share with the trainer's ``train_epoch`` / ``optimizer_step`` (one update per
epoch, accumulation ``ACCUM``); rank 0 writes the trainable parameters before and after, for each
backend.  One process with batch ``2b`` and N processes with batch ``b`` must end in the same place.

``resume``: the real ``train()`` under each backend, whole and cut after epoch 0 then resumed.
``all``: both.  Backends: ``ddp``, ``zero1``, ``zero2``, ``zero2-offload`` (comma-separated).
"""
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from helpers import small_config  # noqa: E402

from lowmem_nablagfn import distributed as dist  # noqa: E402
from lowmem_nablagfn import loop as L  # noqa: E402
from lowmem_nablagfn import trainer as T  # noqa: E402

TOTAL = 8   # trajectories per update, all ranks together
ACCUM = 2   # training batches per update per rank
EPOCHS = 2  # updates
# "linear": with epsilon far above |gradient| AdamW's update is lr/eps x (running mean of the
# gradient): linear in the averaged gradient, so a wrong average (sum, one rank's half) shows
# (plain Adam is blind to the gradient's scale).  "clipped": both groups clipped, each by its own norm.
SETTINGS = {
    "linear": ["training.adam_epsilon=1e3", "training.learning_rate=10", "training.flow_learning_rate=10",
               "training.max_grad_norm=0"],
    "clipped": ["training.adam_epsilon=1e-4", "training.max_grad_norm=1e-3"],
}


def trainable_state(c) -> dict:
    state = {f"lora.{i}": p.detach().clone() for i, p in enumerate(c.lora_params)}
    if c.flow_model is not None:
        state.update({f"flow.{k}": v.detach().clone() for k, v in c.flow_model.state_dict().items()})
    return state


BACKENDS = {
    "ddp": ["distributed.backend=ddp"],
    "zero1": ["distributed.backend=deepspeed", "distributed.zero_stage=1"],
    "zero2": ["distributed.backend=deepspeed", "distributed.zero_stage=2"],
    "zero2-offload": ["distributed.backend=deepspeed", "distributed.zero_stage=2",
                      "distributed.offload_optimizer=true"],
}


def equivalence(out: Path, backend: str, world: int, setting: str) -> dict:
    """Train ``EPOCHS`` updates on fixed data; returns {"before", "after"} on rank 0."""
    batch = TOTAL // (world * ACCUM)
    cfg = small_config(out, f"sampling.batch_size={TOTAL}", f"training.batch_size={batch}",
                       f"training.gradient_accumulation_steps={ACCUM}", *BACKENDS[backend],
                       *SETTINGS[setting], name=f"equiv-{setting}-{backend}-{world}")
    seed = L.epoch_seed
    L.epoch_seed = lambda cfg, epoch, purpose: 1000 + 10 * epoch + purpose  # the same data on every rank
    try:
        c = L.setup(cfg)
        assert dist.world_size() == world, (dist.world_size(), world)
        before = trainable_state(c)
        data = L.sample_epoch(c, 0)
        share = TOTAL // world
        mine = data.select(torch.arange(dist.rank() * share, (dist.rank() + 1) * share))
        steps, real_step = [], c.sync.step
        c.sync.step = lambda: (steps.append(1), real_step())[1]  # count the optimiser updates
        for epoch in range(EPOCHS):
            L.train_epoch(c, mine, epoch)
        assert len(steps) == EPOCHS, steps
        after = trainable_state(c)
        c.sync.close()
    finally:
        L.epoch_seed = seed
    return {"before": before, "after": after}


def resume(out: Path, backend: str) -> None:
    """Whole run, and a run cut after epoch 0's checkpoint then resumed (same process group)."""
    extra = [*BACKENDS[backend], "training.num_epochs=2"]
    T.train(small_config(out, *extra, name=f"whole-{backend}"))
    cut = small_config(out, *extra, name=f"cut-{backend}")
    T.train(cut, stop_after_epoch=0)
    T.train(cut, resume="auto")


def main() -> None:
    mode, out = sys.argv[1], Path(sys.argv[2])
    torch.set_num_threads(1)
    world = int(os.environ.get("WORLD_SIZE", 1))
    if os.environ.get("DS_ACCELERATOR") == "cpu":
        # DeepSpeed's CPU backend JIT-builds a shared-memory all-reduce (used by inference only) on
        # its first start, minutes on a busy 2-core runner: gloo does the training collectives
        import deepspeed.ops

        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    backends = sys.argv[3].split(",")
    if mode in ("equivalence", "all"):
        for backend in backends:
            for setting in SETTINGS:
                result = equivalence(out, backend, world, setting)
                if dist.is_main():
                    torch.save(result, out / f"equiv-{setting}-{backend}-{world}.pt")
    if mode in ("resume", "all"):
        for backend in backends:
            resume(out, backend)
    dist.barrier()


if __name__ == "__main__":
    main()
