"""``memory.checkpoint_vae``: per-layer checkpointing of the VAE decoder (``models.set_checkpointing``).

The decoder's output and the gradient w.r.t. the latent equal the plain decoder's and diffusers'
block-level checkpointing's, bit for bit (float64, random weights: the ``tiny`` model's preview
decoder zeroes every residual branch, so it would compare little); every layer is one region,
recomputed once; the backward peaks lower than with either; switching is reversible and survives
``deepcopy`` / ``.to``; no-grad decoding is untouched; an unknown decoder layout is refused."""
import copy

import pytest
import torch
import torch.utils.checkpoint
from diffusers import AutoencoderKL
from torch import nn

from lowmem_nablagfn.memory.plan import Placement
from lowmem_nablagfn.memtrack import LiveBytes
from lowmem_nablagfn.models import build_flow_model, builtin_configs, set_checkpointing

VAES = {
    "tiny": builtin_configs("tiny")["vae"],
    "tiny-sdxl": builtin_configs("tiny-sdxl")["vae"],
    # SD 1.5 / SDXL's layout: 3 resnets per up block
    "tiny, 2 layers per block": dict(builtin_configs("tiny")["vae"], layers_per_block=2),
}


def _vae(name: str) -> AutoencoderKL:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return AutoencoderKL.from_config(VAES[name]).double().eval()


def _latent(size: int = 8) -> torch.Tensor:
    return torch.randn(1, 4, size, size, dtype=torch.float64, generator=torch.Generator().manual_seed(1))


def _decode_and_grad(vae, z):
    """Decoded image and the gradient of a random linear function of it w.r.t. the latent."""
    z = z.detach().requires_grad_(True)
    y = vae.decode(z).sample
    w = torch.randn(y.shape, dtype=y.dtype, generator=torch.Generator().manual_seed(2))
    (g,) = torch.autograd.grad((y * w).sum(), z)
    return y.detach(), g


def _regions(decoder) -> list:
    """The modules that run as their own region (the post-process: by its conv_out)."""
    mid = decoder.mid_block
    out = list(mid.resnets) + [a for a in mid.attentions if a is not None]
    for up in decoder.up_blocks:
        out += list(up.resnets) + list(up.upsamplers or [])
    return out + [decoder.conv_out]


class _CountCheckpoints:
    """Wraps ``torch.utils.checkpoint.checkpoint``: calls, and the deepest nesting seen."""

    def __init__(self, monkeypatch):
        self.calls = self.depth = self.max_depth = 0
        real = torch.utils.checkpoint.checkpoint

        def counted(fn, *args, **kwargs):
            self.calls += 1
            self.depth += 1
            self.max_depth = max(self.max_depth, self.depth)
            try:
                return real(fn, *args, **kwargs)
            finally:
                self.depth -= 1

        monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", counted)


@pytest.mark.parametrize("name", list(VAES))
def test_outputs_and_gradients_equal_unchecked_and_block_level(name):
    vae, z = _vae(name), _latent()
    plain = _decode_and_grad(vae, z)
    assert plain[1].abs().sum() > 0
    vae.enable_gradient_checkpointing()  # diffusers: mid block and whole up blocks
    block = _decode_and_grad(vae, z)
    set_checkpointing(vae, True)
    granular = _decode_and_grad(vae, z)
    for other in (block, granular):
        torch.testing.assert_close(other[0], plain[0], rtol=0, atol=0)
        torch.testing.assert_close(other[1], plain[1], rtol=0, atol=0)


@pytest.mark.parametrize("name", list(VAES))
def test_each_layer_is_one_region_recomputed_once(name, monkeypatch):
    vae = _vae(name)
    set_checkpointing(vae, True)
    dec = vae.decoder
    regions = _regions(dec)
    mid = dec.mid_block
    expected = (len(mid.resnets) + len(mid.attentions) + sum(len(up.resnets) for up in dec.up_blocks)
                + sum(len(up.upsamplers or []) for up in dec.up_blocks) + 1)
    assert len(regions) == expected
    calls = {id(m): 0 for m in regions + [dec.conv_in]}
    for m in regions + [dec.conv_in]:  # pre-hooks: the recomputation stops early, before a forward hook
        m.register_forward_pre_hook(lambda mod, args: calls.__setitem__(id(mod), calls[id(mod)] + 1))
    count = _CountCheckpoints(monkeypatch)
    _decode_and_grad(vae, _latent())
    assert count.calls == expected and count.max_depth == 1  # never nested
    assert calls.pop(id(dec.conv_in)) == 1  # outside every region, as in diffusers
    assert set(calls.values()) == {2}  # forward + one recomputation in backward


def _backward_peak(vae, z) -> int:
    """Live bytes at the peak of decode + backward, above the weights and the latent."""
    with LiveBytes() as mem:
        mem.register_modules(vae).register([z])
        base = mem.current
        _decode_and_grad(vae, z)
    return mem.peak - base


@pytest.mark.parametrize("name", ["tiny", "tiny, 2 layers per block"])
def test_backward_peak_lower_than_block_level_and_none(name):
    """At 256 px the activations are ~100x the tiny VAE's weights."""
    vae, z = _vae(name).float(), _latent(32).float()
    peaks = {"none": _backward_peak(vae, z)}
    vae.enable_gradient_checkpointing()
    peaks["block-level"] = _backward_peak(vae, z)
    set_checkpointing(vae, True)
    peaks["granular"] = _backward_peak(vae, z)
    print(f"\n{name}: decode+backward peak (MiB) " + ", ".join(f"{k} {v / 2**20:.1f}" for k, v in peaks.items()))
    assert peaks["granular"] < peaks["block-level"] < peaks["none"]
    assert sum(p.numel() * p.element_size() for p in vae.decoder.parameters()) < peaks["granular"] / 10


def test_on_off_round_trip_deepcopy_and_state_dict(monkeypatch):
    vae, z = _vae("tiny"), _latent()
    keys, names = list(vae.state_dict()), [n for n, _ in vae.named_modules()]
    reference = _decode_and_grad(vae, z)
    count = _CountCheckpoints(monkeypatch)
    expected = len(_regions(vae.decoder))
    for on in (True, False, True):
        set_checkpointing(vae, on)
        before = count.calls
        out = _decode_and_grad(vae, z)
        assert count.calls - before == (expected if on else 0)
        torch.testing.assert_close(out, reference, rtol=0, atol=0)
    assert list(vae.state_dict()) == keys and [n for n, _ in vae.named_modules()] == names

    vae.to("cpu").to(torch.float64)
    twin = copy.deepcopy(vae)
    assert twin.decoder.forward.__self__ is twin.decoder  # rebound: runs the copy's own weights
    before = count.calls
    torch.testing.assert_close(_decode_and_grad(twin, z), reference, rtol=0, atol=0)
    assert count.calls - before == expected
    with torch.no_grad():
        twin.decoder.conv_out.bias.add_(1.0)
    assert not torch.equal(_decode_and_grad(twin, z)[0], reference[0])
    torch.testing.assert_close(_decode_and_grad(vae, z), reference, rtol=0, atol=0)

    vae.enable_gradient_checkpointing()  # switching off also ends diffusers' block-level checkpointing
    set_checkpointing(vae, False)
    assert "forward" not in vae.decoder.__dict__
    assert not any(getattr(m, "gradient_checkpointing", False) for m in vae.decoder.modules())


def test_no_grad_decode_unaffected(monkeypatch):
    vae, z = _vae("tiny-sdxl"), _latent()
    with torch.no_grad():
        plain = vae.decode(z).sample
        set_checkpointing(vae, True)
        count = _CountCheckpoints(monkeypatch)
        checked = vae.decode(z).sample
    assert count.calls == 0
    torch.testing.assert_close(checked, plain, rtol=0, atol=0)


def test_unknown_decoder_layout_is_refused():
    vae = _vae("tiny")
    vae.decoder.up_blocks[1] = nn.Identity()
    with pytest.raises(TypeError, match=r"up_blocks\[1\] is Identity, not UpDecoderBlock2D"):
        set_checkpointing(vae, True)
    vae = _vae("tiny")
    vae.decoder.forward = lambda sample, latent_embeds=None: sample  # someone else's instance forward
    with pytest.raises(TypeError, match="already replaced"):
        set_checkpointing(vae, True)


class _Tower(nn.Module):
    """Stands in for a TowerReward (``set_checkpointing``) or an open_clip model (``set_grad_checkpointing``)."""

    def __init__(self, method: str):
        super().__init__()
        self.state = None
        setattr(self, method, lambda on=True: setattr(self, "state", on))


def test_placement_sets_every_part_to_its_flag():
    vae, reward, clip = _vae("tiny"), _Tower("set_checkpointing"), _Tower("set_grad_checkpointing")
    flow = build_flow_model(4, 8, 32, [32])
    Placement(checkpoint_unet=True, checkpoint_vae=True, checkpoint_reward=True,
              checkpoint_flow=True).apply_checkpointing(flow, vae, reward, None)
    assert flow.is_gradient_checkpointing and reward.state is True and "forward" in vae.decoder.__dict__
    Placement().apply_checkpointing(flow, vae, reward, None)  # every flag off: switches off
    assert not flow.is_gradient_checkpointing and reward.state is False and "forward" not in vae.decoder.__dict__
    set_checkpointing(clip, True)
    assert clip.state is True
    set_checkpointing(nn.Linear(2, 2), True)  # nothing to checkpoint (the built-in colour rewards)
    set_checkpointing(None, True)
