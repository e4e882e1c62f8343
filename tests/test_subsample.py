"""Transition subsampling: the PyTorch reference (draw, Philox, gather) and the dispatch."""
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lowmem_nablagfn import subsample
from lowmem_nablagfn.subsample import SubsampleError, reference as ref

MODES = [  # (T, K, low_variance)
    (50, 10, True), (50, 1, True), (50, 50, True), (12, 3, True), (50, 10, False), (50, 1, False),
    (50, 50, False), (2, 1, True)]


def _chi2(counts: torch.Tensor, expected: float) -> float:
    return float(((counts.double() - expected) ** 2 / expected).sum())


def _chi2_threshold(df: int, z: float = 3.090) -> float:
    """Upper 0.999 quantile of chi-square(df), Wilson-Hilferty (scipy-free, ~0.2% accurate)."""
    c = 2 / (9 * df)
    return df * (1 - c + z * math.sqrt(c)) ** 3


# ----------------------------------------------------------------------------- Philox

def test_philox_known_answer():
    # Random123 known-answer test for Philox4x32-10, counter 0 and key 0: first word 0x6627e8d5
    assert ref.philox_randint(0, torch.zeros(1, dtype=torch.long)).item() == 0x6627E8D5


def test_mulhilo32_exact():
    g = torch.Generator().manual_seed(0)
    b = torch.randint(0, 2**32, (1000,), generator=g, dtype=torch.long)
    b[:3] = torch.tensor([0, 1, 2**32 - 1])
    for a in (ref._PHILOX_ROUND_A, ref._PHILOX_ROUND_B, 2**32 - 1):
        hi, lo = ref._mulhilo32(a, b)
        want = [a * int(x) for x in b]
        assert hi.tolist() == [w >> 32 for w in want]
        assert lo.tolist() == [w & 0xFFFFFFFF for w in want]


def test_philox_range_and_seed_reduction():
    c = torch.arange(2**32 - 8, 2**32 + 8, dtype=torch.long)
    r = ref.philox_randint(5, c)
    assert r.min() >= 0 and r.max() < 2**32
    assert torch.equal(ref.philox_randint(-1, c), ref.philox_randint(2**64 - 1, c))


# ----------------------------------------------------------------------------- structure

@pytest.mark.parametrize("num_steps,k,low_variance", MODES)
@pytest.mark.parametrize("batch", [1, 7])
def test_structure(batch, num_steps, k, low_variance):
    idx = subsample.draw_indices(batch, num_steps, k, low_variance, seed=3, offset=11)
    assert idx.dtype == torch.long and idx.shape == (batch, subsample.num_kept(num_steps, k))
    if k == num_steps:  # every transition once, in random order
        assert torch.equal(idx.sort(dim=1).values, torch.arange(num_steps).expand(batch, -1))
        return
    assert (idx[:, 0] == num_steps - 1).all()
    if low_variance:  # column s in block K - s: blocks from the last to the first
        size = num_steps // k
        assert torch.equal(idx[:, 1:] // size, torch.arange(k - 1, -1, -1).expand(batch, -1))
    else:
        others = idx[:, 1:]
        assert (others >= 0).all() and (others < num_steps - 1).all()
        assert all(len(set(row)) == k for row in others.tolist())


def test_rows_not_all_equal():
    idx = subsample.draw_indices(64, 50, 10, True, seed=0)
    assert len({tuple(r) for r in idx.tolist()}) > 60


# ----------------------------------------------------------------------------- uniformity

def test_uniform_within_blocks_chi_square():
    batch, num_steps, k = 8000, 50, 10
    size = num_steps // k
    idx = subsample.draw_indices(batch, num_steps, k, True, seed=1234)
    within = idx[:, 1:] % size  # (B, K): position inside each block
    counts = torch.stack([torch.bincount(within[:, j], minlength=size) for j in range(k)])
    assert _chi2(counts, batch / size) < _chi2_threshold(k * (size - 1))


def test_blocks_and_trajectories_independent_chi_square():
    batch, num_steps, k = 8000, 50, 10
    size = num_steps // k
    within = subsample.draw_indices(batch, num_steps, k, True, seed=99)[:, 1:] % size
    # two blocks of one trajectory, and one block of neighbouring trajectories (a counter
    # overlap between them would show as a dependence)
    for a, b in [(within[:, 0], within[:, 1]), (within[:-1, 3], within[1:, 3])]:
        joint = torch.bincount(a * size + b, minlength=size * size)
        assert _chi2(joint, len(a) / size**2) < _chi2_threshold(size * size - 1)


def test_uniform_mode_chi_square():
    batch, num_steps, k = 5000, 50, 10
    idx = subsample.draw_indices(batch, num_steps, k, False, seed=5)
    counts = torch.bincount(idx[:, 1:].flatten(), minlength=num_steps - 1)
    assert counts.numel() == num_steps - 1
    assert _chi2(counts, batch * k / (num_steps - 1)) < _chi2_threshold(num_steps - 2)


def test_permutation_first_position_chi_square():
    batch, num_steps = 5000, 20
    idx = subsample.draw_indices(batch, num_steps, num_steps, True, seed=6)
    counts = torch.bincount(idx[:, 0], minlength=num_steps)
    assert _chi2(counts, batch / num_steps) < _chi2_threshold(num_steps - 1)


# ----------------------------------------------------------------------------- errors

def test_indivisible_blocks_error_names_t_k_and_fix():
    with pytest.raises(SubsampleError) as err:
        subsample.draw_indices(4, 50, 3, True, seed=0)
    msg = str(err.value)
    assert "T=50" in msg and "K=3" in msg and "divisible" in msg
    assert "timestep_fraction" in msg and "low_var_subsampling=False" in msg and "10" in msg
    with pytest.raises(SubsampleError, match="T=50"):
        subsample.select_and_gather({"x": torch.zeros(4, 50)}, 4, 50, 3, True, seed=0)
    # the uniform mode has no block constraint
    assert subsample.draw_indices(4, 50, 3, False, seed=0).shape == (4, 4)


@pytest.mark.parametrize("kwargs,match", [
    (dict(batch=2, num_steps=5, k=6), "K=6"), (dict(batch=2, num_steps=5, k=0), "K=0"),
    (dict(batch=0, num_steps=5, k=1), "batch=0"),
    (dict(batch=2, num_steps=5, k=1, offset=-1), "offset"),
    (dict(batch=2, num_steps=5, k=1, offset=2**63 - 1), "offset")])
def test_bad_arguments(kwargs, match):
    kwargs = {"low_variance": True, "seed": 0, **kwargs}
    with pytest.raises(SubsampleError, match=match):
        subsample.draw_indices(**kwargs)


def test_num_blocks():
    assert subsample.num_blocks(50, 0.2) == 10 and subsample.num_blocks(50, 1.0) == 50
    for bad in (0.0, 1.5, 0.01):
        with pytest.raises(SubsampleError, match="timestep_fraction"):
            subsample.num_blocks(50, bad)


def test_wrong_tensor_shape():
    with pytest.raises(SubsampleError, match="'eps'"):
        subsample.select_and_gather({"eps": torch.zeros(3, 49, 2)}, 3, 50, 10, True, seed=0)


# ----------------------------------------------------------------------------- reproducibility

def test_reproducible_from_seed_and_offset():
    a = subsample.draw_indices(16, 50, 10, True, seed=7, offset=100)
    assert torch.equal(a, subsample.draw_indices(16, 50, 10, True, seed=7, offset=100))
    used = subsample.num_counters(16, 50, 10, True)
    assert not torch.equal(a, subsample.draw_indices(16, 50, 10, True, seed=7, offset=100 + used))
    assert not torch.equal(a, subsample.draw_indices(16, 50, 10, True, seed=8, offset=100))
    for lv, k in [(False, 10), (True, 50)]:
        b = subsample.draw_indices(16, 50, k, lv, seed=7, offset=3)
        assert torch.equal(b, subsample.draw_indices(16, 50, k, lv, seed=7, offset=3))
        used = subsample.num_counters(16, 50, k, lv)
        assert not torch.equal(b, subsample.draw_indices(16, 50, k, lv, seed=7, offset=3 + used))


@pytest.mark.parametrize("num_steps,k,low_variance", MODES)
def test_counter_layout_independent_of_batch_split(num_steps, k, low_variance):
    # trajectory b draws from counters offset + b * (counters per trajectory): a batch split in two
    # with the offset advanced draws the same indices (what lets the kernel match at any grid)
    whole = subsample.draw_indices(6, num_steps, k, low_variance, seed=2, offset=5)
    head = subsample.draw_indices(2, num_steps, k, low_variance, seed=2, offset=5)
    tail = subsample.draw_indices(4, num_steps, k, low_variance, seed=2,
                                  offset=5 + subsample.num_counters(2, num_steps, k, low_variance))
    assert torch.equal(whole, torch.cat([head, tail]))


# ----------------------------------------------------------------------------- gather

def _tensors(batch, num_steps, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        "latents": torch.randn(batch, num_steps, 4, 3, 5, generator=g).bfloat16(),
        # time-major storage viewed as (B, T, ...)
        "next_latents": torch.randn(num_steps, batch, 4, 3, 5, generator=g).transpose(0, 1),
        # every other channel of a wider buffer
        "eps": torch.randn(batch, num_steps, 8, 3, 5, generator=g)[:, :, ::2],
        "timesteps": torch.arange(num_steps).flip(0).expand(batch, -1),
        "step_index": torch.arange(num_steps, dtype=torch.int32).repeat(batch, 1),
    }


def _naive(tensors, indices, dtype):
    """The official-style loop: per trajectory, per kept index, index and copy."""
    out = {}
    for name, t in tensors.items():
        cast = dtype if dtype is not None and t.is_floating_point() else t.dtype
        out[name] = torch.stack([torch.stack([t[b, i].to(cast) for i in row])
                                 for b, row in enumerate(indices.tolist())])
    return out


@pytest.mark.parametrize("dtype", [None, torch.float32])
@pytest.mark.parametrize("batch", [1, 5])
def test_gather_matches_naive_indexing(batch, dtype):
    tensors = _tensors(batch, 10)
    assert not tensors["eps"].is_contiguous()
    indices = subsample.draw_indices(batch, 10, 5, True, seed=1)
    out = subsample.gather(tensors, indices, dtype)
    want = _naive(tensors, indices, dtype)
    for name, t in out.items():
        assert t.is_contiguous() and t.dtype == want[name].dtype
        assert torch.equal(t, want[name]), name


def test_select_and_gather_is_draw_then_gather():
    tensors = _tensors(4, 10)
    for lv, k in [(True, 5), (True, 1), (False, 3), (True, 10)]:
        idx, out = subsample.select_and_gather(tensors, 4, 10, k, lv, seed=9, offset=4,
                                               dtype=torch.float32)
        assert torch.equal(idx, subsample.draw_indices(4, 10, k, lv, seed=9, offset=4))
        want = _naive(tensors, idx, torch.float32)
        assert all(torch.equal(out[n], want[n]) for n in tensors)
        assert out["latents"].dtype == torch.float32 and out["timesteps"].dtype == torch.long


def test_select_and_gather_no_tensors():
    idx, out = subsample.select_and_gather({}, 3, 10, 5, True, seed=0)
    assert out == {} and idx.shape == (3, 6)


# ----------------------------------------------------------------------------- dispatch

def test_dispatch_reference_on_cpu(monkeypatch):
    monkeypatch.delenv(subsample.ENV_VAR, raising=False)
    assert subsample.backend(torch.device("cpu")) is ref
    monkeypatch.setenv(subsample.ENV_VAR, "reference")
    assert subsample.backend(torch.device("cuda")) is ref


def test_dispatch_bad_choice(monkeypatch):
    monkeypatch.setenv(subsample.ENV_VAR, "fast")
    with pytest.raises(SubsampleError, match="reference, triton"):
        subsample.select_and_gather({"x": torch.zeros(2, 4)}, 2, 4, 2, True, seed=0)


def test_cpu_path_does_not_import_triton():
    # Triton's import (~1 s, and a CUDA probe) is paid only where the kernel can run
    code = ("import sys, torch; import lowmem_nablagfn.subsample as s; "
            "s.select_and_gather({'x': torch.zeros(2, 4, 3)}, 2, 4, 2, True, seed=0); "
            "print('triton' in sys.modules)")
    env = {k: v for k, v in os.environ.items() if k != subsample.ENV_VAR}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[1], timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "False"
