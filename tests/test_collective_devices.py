"""Every collective on a CUDA job's process group, reproduced on the CPU.

NCCL has no CPU backend: a collective on a CPU tensor raises ``No backend type associated with
device type cpu``.  Gloo registered for CUDA tensors only (``"cuda:gloo"``) has NCCL's device map,
so on a CPU machine it fails the same way.  Two processes (spawned, gloo, a free port) join:

* the group :func:`distributed.init_process_group` makes for a CUDA device, every NCCL entry of
  its backend string played by gloo for the same devices (``nccl`` -> ``cuda:gloo``): every
  collective helper must work there with the CPU tensors the trainer hands it (metrics, flags,
  objects, barriers);
* a group of NCCL alone made by someone else (``cuda:gloo``): the helpers must move their tensors
  to this rank's GPU, the only device that group serves (on a CPU machine: CUDA's own error, not
  the missing backend's).
"""
import os

import pytest
import torch
import torch.distributed as tdist
import torch.multiprocessing as mp

from lowmem_nablagfn import distributed as dist
from lowmem_nablagfn.config.schema import DistributedConfig

NO_CPU_BACKEND = "No backend type associated with device type cpu"


def _nccl_played_by_gloo(backend: str) -> str:
    """``backend`` with NCCL's device map kept and gloo doing the work: ``nccl`` -> ``cuda:gloo``,
    ``cpu:gloo,cuda:nccl`` -> ``cpu:gloo,cuda:gloo``."""
    entries = backend.split(",") if ":" in backend else [f"cuda:{backend}" if backend == "nccl" else backend]
    return ",".join(e.replace(":nccl", ":gloo") for e in entries)


def _join(rank: int, port: int) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)


def _every_helper(rank: int) -> None:
    """Call every collective helper of the package with the tensors its callers pass on a CPU run
    (metrics as floats, flags, objects, gradients and rewards on the CPU) and check the answers."""
    assert dist.mean_over_ranks({"b": float(rank), "a": 1.0}) == {"a": 1.0, "b": 0.5}
    assert dist.any_rank(rank == 1) and not dist.any_rank(False)
    assert dist.broadcast_object(f"dir-{rank}") == "dir-0"
    assert dist.gather_objects([rank]) == [0, 1]
    dist.barrier()
    assert dist.gather_tensor(torch.tensor([float(rank)])).tolist() == [0.0, 1.0]
    p = torch.nn.Parameter(torch.zeros(3))
    p.grad = torch.full((3,), 2.0 * rank)
    dist.average_gradients([p])
    assert p.grad.tolist() == [1.0, 1.0, 1.0]


def _group_made_for_cuda(rank: int, port: int) -> None:
    _join(rank, port)
    real_init = tdist.init_process_group
    tdist.init_process_group = lambda backend, **kw: real_init(_nccl_played_by_gloo(backend), **kw)
    torch.cuda.set_device = lambda device: None  # no GPU here; the group is what is under test
    dist.init_process_group(torch.device("cuda", rank), DistributedConfig())
    _every_helper(rank)
    tdist.destroy_process_group()


def _group_of_nccl_alone(rank: int, port: int) -> None:
    _join(rank, port)
    tdist.init_process_group("cuda:gloo", init_method="env://")  # someone else's NCCL-only group
    with pytest.raises(RuntimeError, match=NO_CPU_BACKEND):  # the stand-in fails as NCCL fails
        tdist.all_reduce(torch.zeros(1))
    if torch.cuda.is_available():
        torch.cuda.set_device(0)  # the helpers may then run on the GPU (gloo moves CUDA tensors)
        _every_helper(rank)
    else:
        try:
            torch.zeros(1, device="cuda")
        except (RuntimeError, AssertionError) as exc:
            no_cuda = str(exc)
        grad = torch.nn.Parameter(torch.zeros(1))
        grad.grad = torch.ones(1)
        for name, call in [("mean_over_ranks", lambda: dist.mean_over_ranks({"a": 1.0})),
                           ("any_rank", lambda: dist.any_rank(True)),
                           ("gather_tensor", lambda: dist.gather_tensor(torch.zeros(1))),
                           ("average_gradients", lambda: dist.average_gradients([grad])),
                           ("barrier", dist.barrier)]:
            try:
                call()
                raise AssertionError(f"{name} ran on a group without a CPU backend and without a GPU")
            except (RuntimeError, AssertionError) as exc:  # it asked for the GPU: CUDA's own error
                assert str(exc) == no_cuda, f"{name}: {exc}"
    tdist.destroy_process_group()


@pytest.mark.distributed
def test_every_collective_works_on_the_group_made_for_cuda():
    """Fails as a 2-GPU run failed at the end of its first epoch when the group is NCCL alone."""
    mp.spawn(_group_made_for_cuda, args=(dist.free_port(),), nprocs=2)


@pytest.mark.distributed
def test_collectives_on_a_group_of_nccl_alone_run_on_the_gpu():
    mp.spawn(_group_of_nccl_alone, args=(dist.free_port(),), nprocs=2)


@pytest.mark.parametrize("backend, played", [("nccl", "cuda:gloo"), ("gloo", "gloo"),
                                             ("cpu:gloo,cuda:nccl", "cpu:gloo,cuda:gloo")])
def test_nccl_is_played_by_gloo_with_its_device_map(backend, played):
    assert _nccl_played_by_gloo(backend) == played
