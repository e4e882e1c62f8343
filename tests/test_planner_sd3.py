"""The planner on SD 3.x (issue #26): the meta build is the run's (transformer and VAE, no text encoder:
the prompt table in host memory), the conditioning is (77 + T5 tokens, 4096) + pooled 2048, and the
shipped trace of SD 3.5 Medium at 1024 px (bf16, LoRA, aesthetic reward) predicts the presets: the
sd35m_rtx4090 preset fits 24 GB within 1.3x the work of the fastest configuration that ignores memory,
no-flow fits 16 GB, sd35m_a100x8 fits 80 GB.  Nothing is traced here (``allow_trace=False``)."""
import pytest

from lowmem_nablagfn import planner
from lowmem_nablagfn.config import load_config
from lowmem_nablagfn.memtrack import GiB

#: the no-flow settings for a 16 GB card the docs and the preset's comment give
NOF_16GB = ["model.no_flow=true", "memory.input_grad_chunk=1"]


@pytest.fixture(scope="module")
def sd35():
    cfg = load_config("sd35m_rtx4090")
    return cfg, planner.Probes(cfg, cache=False, allow_trace=False)


def _predict(cfg, profile, *args):
    try:
        return planner.predict(cfg, profile, *args)
    except planner.MissingProbe as exc:  # the probes changed since the trace was shipped: regenerate it
        pytest.fail(f"shipped SD 3.5 planner profile lacks a probe ({exc}); regenerate it with "
                    f"`lowmem-nablagfn plan --preset sd35m_rtx4090 --vram RTX4090-24` and copy the cache file")


def test_the_meta_build_is_the_runs(sd35):
    """SD 3.5 Medium's transformer (2.24 B parameters and a 0.23 B-entry position table, bf16) and VAE; no text encoder resident; the prompt
    table (the prompt set's train and eval prompts and the CFG row) counted in host memory only."""
    cfg, prof = sd35
    m, st = prof.models, prof.static
    assert m.is_sd3 and m.text_encoders == [] and st["text_encoder"] == 0
    assert m.text_shape == (77 + 256, 4096) and m.pooled_dim == 2048
    assert st["latent_shape"] == [16, 128, 128]
    frozen = sum(p.numel() for p in m.denoiser.parameters() if not p.requires_grad)
    table = sum(b.numel() for b in m.denoiser.buffers())  # the position table, 384² x 1536 (a saved buffer)
    assert 2.2e9 < frozen < 2.3e9 and table == 384 * 384 * 1536, (frozen, table)
    assert st["unet"] == 2 * (frozen + table)  # bf16: 4.94 GB, the size of SD 3.5 Medium's transformer file
    assert st["text_row"] == (333 * 4096 + 2048) * 2
    from lowmem_nablagfn.models.family import run_prompts

    assert st["prompt_table"] == (len(run_prompts(cfg.prompts.set)) + 1) * st["text_row"]
    hub = planner.Probes(load_config("sd35m_rtx4090", ["pretrained.model=sd35m-random"]), cache=False, allow_trace=False)
    assert hub.hash == prof.hash  # the built-in random model and the hub id share one trace


def test_the_prompt_table_is_host_memory(sd35):
    """On a GPU the table stays in host memory; on the CPU (host = device) every phase holds it."""
    cfg, prof = sd35
    gpu = _predict(cfg, prof)
    cpu_cfg = load_config("sd35m_rtx4090", ["device=cpu"])
    cpu = _predict(cpu_cfg, planner.Probes(cpu_cfg, cache=False, allow_trace=False))
    for name in ("encode", "sampling", "reference", "train"):  # (the optimiser step's temporaries differ)
        assert cpu.phases[name] - (gpu.phases[name] - gpu.allowances[name]) == pytest.approx(
            prof.static["prompt_table"] + _vae_encoder(prof), rel=1e-6), name


def _vae_encoder(prof):
    """The VAE encoder's bytes: on a GPU it stays in host memory (training only decodes)."""
    from lowmem_nablagfn.models import vae_encoder_modules
    from lowmem_nablagfn.planner.meta import nbytes

    return sum(nbytes(x) for x in vae_encoder_modules(prof.models.vae))


def test_rtx4090_preset_fits_24gb_within_1_3x_of_the_fastest(sd35):
    cfg, prof = sd35
    pred = _predict(cfg, prof)
    assert pred.fits(planner.CARDS["RTX4090-24"]), (pred.peak / GiB, pred.peak_phase)
    assert cfg.training.batch_size >= 2 and not cfg.model.no_flow
    fastest = planner.propose(cfg, prof, 1e6)  # memory ignored
    assert fastest is not None
    ratio = pred.tflop_per_update / fastest.prediction.tflop_per_update
    assert ratio <= 1.3, ratio


def test_no_flow_fits_16gb_and_the_cluster_preset_80gb(sd35):
    cfg, prof = sd35
    nof = load_config("sd35m_rtx4090", NOF_16GB)
    pred = _predict(nof, prof)
    assert pred.fits(planner.parse_vram("16GB")), (pred.peak / GiB, pred.peak_phase)
    a100 = load_config("sd35m_a100x8")
    assert a100.distributed.backend == "deepspeed" and a100.distributed.zero_stage == 2
    pred = _predict(a100, planner.Probes(a100, cache=False, allow_trace=False))
    assert pred.fits(planner.CARDS["A100-80"]), (pred.peak / GiB, pred.peak_phase)


def test_transformer_checkpointing_goes_through_the_one_switch(sd35):
    """``memory.checkpoint_unet`` checkpoints the MMDiT's blocks (the plan's flag -> module map): the
    traced input-gradient pass keeps a fraction of the bytes it keeps without."""
    _, prof = sd35
    on = prof.get("unet_chain", {"unet": True}, rows=1)["F"]
    off = prof.get("unet_chain", {"unet": False}, rows=1)["F"]
    assert on < 0.1 * off, (on / GiB, off / GiB)


def test_the_docs_state_what_the_benchmark_prints(monkeypatch):
    """docs/sd3.md's memory table is `python benchmarks/plan_presets.py`'s output, row for row, and the
    README's and the preset's "predicted 17.0 GiB" is its first row."""
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    monkeypatch.syspath_prepend(str(root / "benchmarks"))
    import plan_presets

    table = plan_presets.rows("sd3")
    doc = (root / "docs" / "sd3.md").read_text()
    for line in table.splitlines():
        assert line in doc, line
    first = table.splitlines()[2]
    assert "| 17.02, reward_grad_next | 19.17 | yes | 1.25x |" in first, first
    assert "`sd35m_rtx4090`\n(Stable Diffusion 3.5 Medium, predicted 17.0 GiB" in (root / "README.md").read_text()
    assert "prediction 17.0 GiB in reward_grad_next" in (root / "configs" / "sd35m_rtx4090.yaml").read_text()


def test_a_local_sd3_directory_is_planned_from_its_own_configs(tmp_path, sd35):
    """A saved SD 3 pipeline directory is read (transformer and VAE configs); an uncached hub id that names
    stable-diffusion-3 is SD 3.5 Medium's architecture, said so."""
    from lowmem_nablagfn.models.sd3 import build_random_sd3, sd3_pipeline

    sd3_pipeline(build_random_sd3("tiny-sd3")).save_pretrained(str(tmp_path))
    configs, source = planner.model_configs(str(tmp_path))
    assert source == str(tmp_path) and set(configs) == {"transformer", "vae"}
    assert configs["transformer"]["joint_attention_dim"] == 96 and configs["vae"]["latent_channels"] == 16
    cfg = load_config("tiny_cpu", [f"pretrained.model={tmp_path}"])
    assert cfg.sampling.scheduler == "flow-sde"  # the sampler follows the directory's family
    m = planner.build_meta(cfg)
    assert m.is_sd3 and m.latent_shape == (16, 8, 8) and m.text_shape == (333, 96) and m.pooled_dim == 80
    assert "SD 3.5 Medium architecture assumed" in sd35[1].source
