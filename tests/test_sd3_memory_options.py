"""SD 3.x through every memory option (issue #26): the LoRA and flow gradients of one update with the
transformer's blocks checkpointed (``memory.checkpoint_unet``, the plan's one switch), the VAE decoder
checkpointed per layer, the reward's and the flow model's checkpointing and uneven chunks of rows equal the
naive schedule's, on ``tiny-sd3`` with its flow-SDE transitions (last ones included).  ``lora_B`` is
perturbed first: at its zero init every ``lora_A`` gradient would be zero and the comparison empty."""
import pytest
import torch
from helpers import small_config
from test_memory import OPTIONS, REWARD, _grads

from lowmem_nablagfn import loop as L
from lowmem_nablagfn.memory import Rows
from lowmem_nablagfn.sampling import Conditioning


@pytest.fixture(scope="module", params=["residual", "no_flow"])
def sd3_rows(request, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sd3mem")
    mp = pytest.MonkeyPatch()
    mp.setenv("XDG_CACHE_HOME", str(tmp / "xdg"))  # the prompt table
    extra = ["model.no_flow=true"] if request.param == "no_flow" else []
    c = L.setup(small_config(tmp, "pretrained.model=tiny-sd3", "pretrained.max_sequence_length=8", *REWARD, *extra))
    mp.undo()
    assert c.sched.name == "flow-sde" and hasattr(c.reward_model, "set_checkpointing")
    gen = torch.Generator().manual_seed(0)
    for name, p in c.parts.denoiser.named_parameters():
        if "lora_B" in name:
            p.data.copy_(0.05 * torch.randn(p.shape, generator=gen))
    data = L.sample_epoch(c, 0)
    assert isinstance(data.prompt_embeds, Conditioning) and data.prompt_embeds.prompt_embeds.shape[1:] == (77 + 8, 96)
    rows = Rows.from_trajectories(data.select(torch.arange(2)), c.sched.num_steps, c.device)
    assert 0 < int(rows.end.sum()) < len(rows)  # last transitions and live ones
    naive, naive_terms = _grads(c, rows, {"mode": "naive"})
    return c, rows, naive, naive_terms


def test_sd3_gradients_equal_naive(sd3_rows):
    """Every option at once (the SD 1.x tests cover each alone): checkpointed transformer, VAE decoder,
    reward and flow model, input-gradient chunks of 5 rows and training chunks of 4 (uneven)."""
    c, rows, naive, naive_terms = sd3_rows
    assert all(g.abs().sum() > 0 for g in naive.values())
    grads, terms = _grads(c, rows, OPTIONS["all"])
    assert c.parts.denoiser.gradient_checkpointing  # the switch reached the transformer's blocks
    for key, g in naive.items():
        assert torch.allclose(grads[key], g, rtol=1e-4, atol=1e-5 * float(g.abs().max())), key
    assert float(terms["loss"]) == pytest.approx(float(naive_terms["loss"]), rel=1e-4)
