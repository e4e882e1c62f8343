"""The fused Triton subsampling kernel against the PyTorch reference, bit for bit.

Every case runs twice: on CPU through Triton's interpreter, in a subprocess (``TRITON_INTERPRET``
must be set before triton is imported, and must not leak into other tests), and on CUDA
(``gpu``-marked, skipped without a device). Run as a script, this file runs the cases itself:
``TRITON_INTERPRET=1 python tests/test_subsample_triton.py`` prints one JSON line of results.
"""
import json
import os
import subprocess
import sys
import traceback
from pathlib import Path

import pytest
import torch

from lowmem_nablagfn import subsample
from lowmem_nablagfn.subsample import SubsampleError, reference as ref

ROOT = Path(__file__).resolve().parents[1]


def _kernel():
    from lowmem_nablagfn.subsample import triton_kernel
    return triton_kernel


def _tensors(batch, num_steps, device, seed=0):
    """Per-transition tensors in the storage layouts the trainer may hand over.

    The views are taken on ``device``: moving a non-dense view would make it contiguous.
    """
    g = torch.Generator().manual_seed(seed)
    layouts = {  # name -> (storage, view as (B, T, ...))
        "latents": (torch.randn(batch, num_steps, 2, 3, 4, generator=g).bfloat16(), None),
        # time-major storage
        "next_latents": (torch.randn(num_steps, batch, 2, 3, 4, generator=g),
                         lambda x: x.transpose(0, 1)),
        # every other channel of a wider buffer: two strided trailing dims
        "eps": (torch.randn(batch, num_steps, 4, 3, 4, generator=g).half(),
                lambda x: x[:, :, ::2]),
        # channels-last-like: (B, T, H, W, C) storage
        "eps_cl": (torch.randn(batch, num_steps, 3, 4, 2, generator=g),
                   lambda x: x.permute(0, 1, 4, 2, 3)),
        # one row of timesteps shared by every trajectory (stride 0 over B)
        "timesteps": (torch.linspace(999, 0, num_steps), lambda x: x.expand(batch, -1)),
        "step_index": (torch.arange(num_steps).repeat(batch, 1), None),
    }
    return {name: (view or (lambda x: x))(x.to(device)) for name, (x, view) in layouts.items()}


def _assert_same(got, want):
    (idx_k, out_k), (idx_r, out_r) = got, want
    assert torch.equal(idx_k, idx_r), f"indices differ:\n{idx_k}\n{idx_r}"
    assert out_k.keys() == out_r.keys()
    for name in out_r:
        assert out_k[name].dtype == out_r[name].dtype, name
        assert out_k[name].shape == out_r[name].shape, name
        assert out_k[name].is_contiguous(), name
        assert torch.equal(out_k[name], out_r[name]), name


def _both(device, batch, num_steps, k, low_variance, seed=7, offset=0, dtype=torch.float32):
    tensors = _tensors(batch, num_steps, device)
    args = (tensors, batch, num_steps, k, low_variance, seed, offset, dtype)
    _assert_same(_kernel().select_and_gather(*args), ref.select_and_gather(*args))


# ----------------------------------------------------------------------------- cases

def case_blocks(device):
    _both(device, 3, 12, 4, True)


def case_one_block(device):
    _both(device, 3, 12, 1, True)


def case_blocks_no_cast(device):
    _both(device, 2, 6, 3, True, dtype=None)


def case_batch_one(device):
    _both(device, 1, 10, 5, True)


def case_uniform_and_permutation(device):
    _both(device, 3, 8, 3, False)
    _both(device, 3, 8, 8, True)
    _both(device, 3, 8, 8, False)


def case_large_seed_and_offset(device):
    # 64-bit key and counters past 2**32: Triton's int64 specialisation and the high counter word
    _both(device, 2, 12, 4, True, seed=2**64 - 1, offset=2**40 + 3)
    _both(device, 2, 12, 4, True, seed=2**31, offset=2**32 - 5)


def case_offsets_differ(device):
    tensors = _tensors(4, 12, device)
    a, _ = _kernel().select_and_gather(tensors, 4, 12, 4, True, seed=1, offset=0)
    b, _ = _kernel().select_and_gather(tensors, 4, 12, 4, True, seed=1, offset=16)
    c, _ = _kernel().select_and_gather(tensors, 4, 12, 4, True, seed=1, offset=0)
    assert torch.equal(a, c) and not torch.equal(a, b)


def case_launch_shape_independent(device):
    # a batch split in two launches, offset advanced by the counters used, draws the same rows
    tensors = _tensors(6, 12, device)
    whole, _ = _kernel().select_and_gather(tensors, 6, 12, 4, True, seed=3, offset=10)
    head = {n: t[:2] for n, t in tensors.items()}
    tail = {n: t[2:] for n, t in tensors.items()}
    h, _ = _kernel().select_and_gather(head, 2, 12, 4, True, seed=3, offset=10)
    t, _ = _kernel().select_and_gather(tail, 4, 12, 4, True, seed=3, offset=10 + 2 * 4)
    assert torch.equal(whole, torch.cat([h, t]))
    assert torch.equal(whole.cpu(), subsample.draw_indices(6, 12, 4, True, seed=3, offset=10))


def case_gather_given_indices(device):
    # the same indices in: the same bits out, repeats included, in both cast directions
    tensors = _tensors(3, 9, device)
    tensors["wide"] = torch.randn(3, 9, 5000, device=device)  # several chunks per row
    idx = torch.tensor([[8, 0, 0, 4], [1, 2, 3, 8], [7, 7, 7, 7]], device=device)
    for dtype in (None, torch.float32, torch.bfloat16):
        want = ref.gather(tensors, idx, dtype)
        if dtype == torch.bfloat16 and device == "cpu":
            want = _interpreter_bf16(tensors, idx, want)
        _assert_same((idx, _kernel().gather(tensors, idx, dtype)), (idx, want))


def _interpreter_bf16(tensors, idx, want):
    """Triton's interpreter rounds float -> bf16 toward zero (compiled kernels and torch: to
    nearest even, which the CUDA run checks); expect that for the tensors it rounds."""
    wide = ref.gather(tensors, idx, torch.float32)
    return {name: (wide[name].view(torch.int32) & -65536).view(torch.float32).bfloat16()
            if tensors[name].is_floating_point() and tensors[name].dtype != torch.bfloat16
            else out for name, out in want.items()}


def case_uncollapsible_layout(device):
    # three strided trailing dims: made contiguous first (documented cost), same result
    x = torch.randn(3, 8, 4, 5, 6, device=device)[:, :, ::2, ::2, ::2]
    assert _kernel()._collapse_inner(x) is None
    args = ({"x": x}, 3, 8, 4, True, 5, 0, None)
    _assert_same(_kernel().select_and_gather(*args), ref.select_and_gather(*args))


def case_out_of_range_indices(device):
    tensors = {"x": torch.zeros(2, 5, 3, device=device)}
    try:
        _kernel().gather(tensors, torch.tensor([[0, 5], [1, 2]], device=device))
    except SubsampleError as exc:
        assert "[0, 5)" in str(exc)
    else:
        raise AssertionError("out-of-range indices accepted")


def case_dispatch_forced(device):
    os.environ[subsample.ENV_VAR] = "triton"
    try:
        assert subsample.backend(torch.device(device)) is _kernel()
        tensors = _tensors(2, 12, device)
        got = subsample.select_and_gather(tensors, 2, 12, 3, True, seed=4, offset=1)
        _assert_same(got, ref.select_and_gather(tensors, 2, 12, 3, True, seed=4, offset=1))
    finally:
        del os.environ[subsample.ENV_VAR]


CASES = {name[len("case_"):]: fn for name, fn in sorted(globals().items())
         if name.startswith("case_")}


def _run_cases(device):
    """name -> "ok" or the failure's traceback."""
    results = {}
    for name, fn in CASES.items():
        try:
            fn(device)
            results[name] = "ok"
        except Exception:  # report every case, not only the first failure
            results[name] = traceback.format_exc()
    return results


# ----------------------------------------------------------------------------- interpreter (CPU)

@pytest.fixture(scope="module")
def interpreted():
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}
    env.pop(subsample.ENV_VAR, None)
    proc = subprocess.run([sys.executable, __file__], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("case", sorted(CASES))
def test_interpreted(interpreted, case):
    assert interpreted[case] == "ok", interpreted[case]


def test_kernel_refuses_cpu_without_interpreter(monkeypatch):
    pytest.importorskip("triton")
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("this process runs Triton's interpreter")
    monkeypatch.setenv(subsample.ENV_VAR, "triton")
    with pytest.raises(SubsampleError, match="CUDA tensors"):
        subsample.select_and_gather({"x": torch.zeros(2, 4)}, 2, 4, 2, True, seed=0)


# ----------------------------------------------------------------------------- CUDA

@pytest.mark.gpu
@pytest.mark.parametrize("case", sorted(CASES))
def test_cuda(case):
    pytest.importorskip("triton")
    CASES[case]("cuda")


@pytest.mark.gpu
def test_cuda_auto_dispatch_uses_kernel(monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.delenv(subsample.ENV_VAR, raising=False)
    assert subsample.backend(torch.device("cuda")) is _kernel()


if __name__ == "__main__":
    print(json.dumps(_run_cases("cuda" if os.environ.get("TRITON_INTERPRET") != "1" else "cpu")))
