"""The run report: valid HTML whose every image is a non-empty PNG in the run directory; plots redrawn
only when their data changed; a broken run directory warns instead of stopping training."""
import json
from html.parser import HTMLParser

import pytest
import torch

from lowmem_nablagfn.config import load_config, to_dict
from lowmem_nablagfn.report import read_metrics, refresh_report, write_report

VOID = {"meta", "img", "br", "hr", "link", "input"}
PNG = b"\x89PNG\r\n\x1a\n"


class Checker(HTMLParser):
    """Collects <img> sources and checks that every non-void tag is closed in order."""

    def __init__(self):
        super().__init__()
        self.stack, self.images, self.errors, self.text = [], [], [], []

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.images.append(dict(attrs)["src"])
        elif tag not in VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        if not self.stack or self.stack.pop() != tag:
            self.errors.append(tag)

    def handle_data(self, data):
        self.text.append(data)


def parse(path):
    checker = Checker()
    checker.feed(path.read_text())
    checker.close()
    assert not checker.errors and not checker.stack, (checker.errors, checker.stack)
    return checker


@pytest.fixture
def run(tmp_path):
    """A run directory as train() leaves it after 4 epochs (and a half-written last metrics line)."""
    from torchvision.utils import save_image

    cfg = load_config("tiny_cpu", ["logging.run_name=rep <&> run"])
    (tmp_path / "config.json").write_text(json.dumps(to_dict(cfg)))
    lines = []
    for epoch in range(-1, 4):
        row = {"epoch": epoch, "reward/mean": 0.1 + 0.01 * epoch, "reward/std": 0.01, "reward/max": 0.2,
               "time/sample_s": 1.0, "time/epoch_s": 2.5, "memory/peak_gb": 1.2, "optimizer_steps": 2 * (epoch + 1)}
        if epoch >= 0:
            row.update({"train/loss": 1000.0 / (epoch + 1), "train/forward": 300.0, "train/reverse": 700.0,
                        "train/terminal": 0.04, "train/reg": 1e-4, "train/grad_norm/lora": 6.0 + epoch,
                        "train/grad_norm/flow": 25.0, "time/train_s": 1.5})
        lines.append(json.dumps(row))
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + '\n{"epoch": 4, "rew')
    (tmp_path / "samples").mkdir()
    for i in range(5):
        save_image(torch.rand(4, 3, 16, 16), str(tmp_path / "samples" / f"epoch_{i:04d}.png"))
    save_image(torch.rand(4, 3, 16, 16), str(tmp_path / "samples" / "final.png"))
    (tmp_path / "eval").mkdir()
    save_image(torch.rand(2, 3, 16, 16), str(tmp_path / "eval" / "eval_lora_finetuned.png"))
    reward = {"mean": 0.2, "std": 0.01}
    (tmp_path / "eval" / "eval_lora.json").write_text(json.dumps({
        "tag": "lora", "sample_grids": {"finetuned": "eval_lora_finetuned.png"},
        "metrics": {"reward": {"finetuned": reward, "base": reward, "name": "builtin:redness"},
                    "diversity": {"finetuned": 0.5, "base": 0.6, "method": "pixel-cosine"},
                    "fid_vs_base": {"value": None, "message": "needs weights"},
                    "clip_score": {"finetuned": None, "base": None, "message": "needs --clip"}}}))
    return tmp_path


def test_report_renders_with_existing_pngs(run):
    path = write_report(run, force=True)
    page = parse(path)
    assert len(page.images) == 5 + 2 + 5 + 1  # 5 curves, before/latest, 5 epoch grids, 1 evaluation grid
    for src in page.images:
        data = (run / src).read_bytes()
        assert data.startswith(PNG) and len(data) > 100, src
    text = " ".join(page.text)
    for needle in ("rep <&> run", "peak memory", "sampling throughput", "before training", "after 4 epochs",
                   "final", "eval_lora.json", "simple_animals", "Configuration"):
        assert needle in text, needle
    assert len(read_metrics(run / "metrics.jsonl")) == 5  # the half-written line is skipped


def test_plots_redrawn_only_when_data_changes(run):
    write_report(run, force=True)
    stamp = {p.name: p.stat().st_mtime_ns for p in (run / "report").glob("*.png")}
    write_report(run, force=True)
    assert stamp == {p.name: p.stat().st_mtime_ns for p in (run / "report").glob("*.png")}
    with open(run / "metrics.jsonl", "a") as f:  # finish the half-written line: a new epoch
        f.write('ard/mean": 0.5, "memory/peak_gb": 1.3}\n')
    write_report(run, force=False, min_interval=3600)  # throttled: data changed but drawn recently
    assert stamp["reward.png"] == (run / "report" / "reward.png").stat().st_mtime_ns
    write_report(run, force=True)
    assert stamp["reward.png"] != (run / "report" / "reward.png").stat().st_mtime_ns
    assert stamp["loss.png"] == (run / "report" / "loss.png").stat().st_mtime_ns  # loss terms unchanged


def test_refresh_report_warns_instead_of_raising(tmp_path):
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("x")
    with pytest.warns(UserWarning, match="report"):
        assert refresh_report(not_a_dir) is None


def test_before_and_latest_side_by_side_and_every_epoch(run):
    page = write_report(run, force=True).read_text()
    before_after = page.split("Before and after", 1)[1].split("<h3>", 1)[0]
    assert "samples/epoch_0000.png" in before_after and "samples/final.png" in before_after
    every = page.split("Every epoch", 1)[1].split("<h2>", 1)[0]
    assert [f"samples/epoch_{i:04d}.png" in every for i in range(5)] == [True] * 5
    assert "shown:" not in page  # nothing left out


def test_many_epochs_are_subsampled_evenly_and_say_so(run):
    from torchvision.utils import save_image

    from lowmem_nablagfn.report import MAX_GRIDS

    for i in range(5, 60):
        save_image(torch.rand(4, 3, 8, 8), str(run / "samples" / f"epoch_{i:04d}.png"))
    page = write_report(run, force=True).read_text()
    strip = page.split("Across epochs", 1)[1].split("<h2>", 1)[0]
    shown = [i for i in range(60) if f"samples/epoch_{i:04d}.png" in strip]
    assert len(shown) == MAX_GRIDS and shown[0] == 0 and shown[-1] == 59
    gaps = {b - a for a, b in zip(shown, shown[1:])}
    assert max(gaps) - min(gaps) <= 1  # evenly spaced
    assert f"shown: {MAX_GRIDS} of 60, evenly spaced" in page


def test_sample_grids_of_small_images_are_enlarged(tmp_path):
    from PIL import Image

    from lowmem_nablagfn.images import save_grid

    images = torch.rand(4, 3, 64, 64)
    save_grid(images, tmp_path / "g.png")
    grid = Image.open(tmp_path / "g.png")
    assert grid.size == (2 * 128 + 3 * 2, 2 * 128 + 3 * 2)  # 2x2 of 128 px, torchvision's 2-px padding
    pixels = torch.tensor(list(grid.getdata()), dtype=torch.float32).T.reshape(3, *grid.size[::-1]) / 255
    first = pixels[:, 2:130, 2:130]
    assert torch.allclose(first[:, ::2, ::2], first[:, 1::2, 1::2])  # nearest neighbour: 2x2 blocks
    assert torch.allclose(first[:, ::2, ::2], images[0], atol=1 / 255 + 1e-6)
