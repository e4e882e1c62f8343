"""The end-of-run summaries: what happened (reward start -> end, epochs, time, memory), where the files
are, and the next commands — built from the files a run writes."""
import json

from lowmem_nablagfn.summary import eval_summary, train_summary


def _run(tmp_path):
    run = tmp_path / "runs" / "demo"
    (run / "lora").mkdir(parents=True)
    (run / "samples").mkdir()
    (run / "samples" / "final.png").write_bytes(b"x")
    (run / "checkpoints").mkdir()
    (run / "checkpoints" / "latest").write_text("epoch-000003\n")
    (run / "report.html").write_text("<html></html>")
    (run / "config.json").write_text(json.dumps({"device": "cpu", "reward": {"name": "builtin:redness"}}))
    rows = [{"epoch": e, "reward/mean": 0.03 + 0.1 * (e + 1), "reward/std": 0.02, "time/epoch_s": 1.5,
             "memory/peak_gb": 1.25 + 0.01 * e} for e in range(-1, 4)]
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return run


def test_train_summary_says_what_happened_and_what_next(tmp_path, monkeypatch):
    run = _run(tmp_path)
    monkeypatch.chdir(tmp_path)
    text = train_summary(run, elapsed_s=42.4)
    assert "Finished 4 epochs in 42 s (1.5 s per epoch); peak memory 1.28 GiB (max resident)." in text
    assert "Reward (builtin:redness, mean ± std of each epoch's samples): 0.03 ± 0.02 (before training) " \
           "→ 0.43 ± 0.02 (epoch 3); best 0.43 (epoch 3)." in text
    for needle in ("runs/demo/lora/", 'load_lora_weights("runs/demo/lora")', "runs/demo/report.html",
                   "runs/demo/samples/", "runs/demo/checkpoints/epoch-000003", "--resume",
                   "lowmem-nablagfn eval runs/demo", "lowmem-nablagfn export runs/demo --format kohya "
                   "--out demo.safetensors", "lowmem-nablagfn report runs/demo"):
        assert needle in text, needle
    assert str(tmp_path) not in text  # paths below the working directory are shown relative


def test_train_summary_of_an_empty_run_does_not_fail(tmp_path):
    text = train_summary(tmp_path / "nothing")
    assert text.startswith("Finished 0 epochs.") and "lowmem-nablagfn eval" in text


def test_eval_summary(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = {"target": "runs/demo/lora/pytorch_lora_weights.safetensors", "run_dir": str(tmp_path / "runs/demo"),
              "prompts": {"count": 3, "split": "eval"}, "settings": {"images_per_prompt": 4}, "time_s": 14.2,
              "sample_grids": {"finetuned": "eval_lora_finetuned.png", "base": "eval_lora_base.png"},
              "metrics": {"reward": {"finetuned": {"mean": 0.31, "std": 0.02}, "base": {"mean": 0.05, "std": 0.03},
                                     "name": "builtin:redness"}}}
    text = eval_summary(result, tmp_path / "runs/demo/eval/eval_lora.json", peak_memory_gb=1.5)
    assert "12 images per policy (3 eval prompts × 4) in 14 s; peak memory 1.50 GiB." in text
    assert "base 0.05 ± 0.03 → finetuned 0.31 ± 0.02 (same seeds)" in text
    for needle in ("runs/demo/eval/eval_lora.json", "runs/demo/eval/eval_lora_finetuned.png",
                   "runs/demo/report.html", "lowmem-nablagfn export runs/demo", "lowmem-nablagfn report runs/demo"):
        assert needle in text, needle
