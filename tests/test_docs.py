"""README.md and docs/*.md say only what this checkout does: every relative link and ``#anchor``
resolves; every dotted ``key=value`` override they show is accepted by the configuration; every
``lowmem-nablagfn SUBCOMMAND`` names a subcommand; every preset, script and repository path they name
exists.  Fast (no model is built): the configuration is only loaded."""
from __future__ import annotations

import contextlib
import io
import re
from dataclasses import fields, is_dataclass
from pathlib import Path
from typing import Dict, List, Set

import pytest

from lowmem_nablagfn.config import Config, list_presets, load_config

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
IDS = [p.relative_to(ROOT).as_posix() for p in DOCS]

#: The configuration sections (Config's fields that hold a section), plus ``eval``, which the
#: before-stop hook also extracts (no such section exists, so a doc showing ``eval.x=...`` fails).
SECTIONS = tuple(f.name for f in fields(Config) if is_dataclass(getattr(Config(), f.name))) + ("eval",)
#: Top-level keys that are overrides on their own (``device=cuda``, ``seed=0``).
TOP_KEYS = tuple(f.name for f in fields(Config) if not is_dataclass(getattr(Config(), f.name)))
#: The before-stop hook's pattern (/work/shared/hooks/before-stop), top-level keys added, and a mapping
#: value ``{a: 1, b: 2}`` taken whole (``reward.mix``).  The look-behind skips the official spelling
#: ``--config.model.x=…`` (mapped by the CLI, not a dotted key).
OVERRIDE = re.compile(r"(?<![\w./-])((?:" + "|".join(SECTIONS) + r")\.[a-z_][\w.]*|(?:" + "|".join(TOP_KEYS)
                      + r")) ?= ?(\{[^}\n]*\}|[^\s`|)]+)")
#: Values shown as placeholders, not as something to type.
PLACEHOLDERS = {"PATH", "DIR", "N", "NAME", "P"}
#: Overrides the docs show as refused, with the refusal (configuration.md: how a bad value is reported).
SHOWN_REFUSED = {"seed=no"}
#: Directories whose paths, when a doc names them, must exist in the checkout.
PATH_ROOTS = ("benchmarks", "launch", "configs", "tests", "lowmem_nablagfn", "docs", ".ci")
PATH = re.compile(r"(?<![\w/.~-])((?:" + "|".join(re.escape(r) for r in PATH_ROOTS) + r")/[\w./-]*)")
LINK = re.compile(r"(?<!!)\[([^\]]*)\]\(([^)\s]+)\)|!\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^(```|~~~).*?^\1[^\n]*$", re.M | re.S)
SPAN = re.compile(r"`([^`\n]+)`")


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: its text (inline markup removed), lowercased, every character
    that is not a letter, digit, space, ``-`` or ``_`` removed, spaces turned into ``-``."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # [text](url) -> text
    text = text.replace("`", "").replace("*", "")
    text = re.sub(r"[^\w\- ]", "", text.strip().lower())
    return text.replace(" ", "-")


def prose(text: str) -> str:
    """The text without fenced code blocks (whose ``#`` lines are comments, not headings)."""
    return FENCE.sub("", text)


def code(text: str) -> List[str]:
    """Every fenced block's body and every inline code span: where commands are shown."""
    blocks = [m.group(0) for m in FENCE.finditer(text)]
    return blocks + SPAN.findall(prose(text))


def anchors(path: Path) -> Set[str]:
    """The anchors of a markdown file's headings (a repeated heading gets ``-1``, ``-2``, … as on GitHub)."""
    seen: Dict[str, int] = {}
    out = set()
    for m in re.finditer(r"^#{1,6}\s+(.+?)\s*#*\s*$", prose(path.read_text()), re.M):
        s = slug(m.group(1))
        out.add(s if s not in seen else f"{s}-{seen[s]}")
        seen[s] = seen.get(s, 0) + 1
    return out


def broken_links(doc: Path, root: Path = ROOT) -> List[str]:
    """``target: why`` for every relative link of ``doc`` whose file or heading anchor is missing."""
    problems = []
    for m in LINK.finditer(SPAN.sub("", prose(doc.read_text()))):
        target = m.group(2) or m.group(3)
        if re.match(r"^[a-z]+:", target):  # http(s):, mailto: — not checked offline
            continue
        path, _, anchor = target.partition("#")
        dest = (doc.parent / path).resolve() if path else doc
        rel = dest.relative_to(root).as_posix() if dest.is_relative_to(root) else str(dest)
        if not dest.exists():
            problems.append(f"{target}: {rel} does not exist")
            continue
        if anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            problems.append(f"{target}: no heading of {rel} has the anchor #{anchor} "
                            f"(it has: {', '.join(sorted(anchors(dest)))})")
    return problems


def test_slug_is_githubs():
    assert slug("When something goes wrong") == "when-something-goes-wrong"
    assert slug("Does it sample the tilted distribution? (analytic validation)") == \
        "does-it-sample-the-tilted-distribution-analytic-validation"
    assert slug("2. Download the models") == "2-download-the-models"
    assert slug("`memory.*`: options") == "memory-options"
    assert slug("A cluster: torchrun, DeepSpeed, SLURM") == "a-cluster-torchrun-deepspeed-slurm"


def test_a_broken_link_is_found(tmp_path):
    """The checker itself: a missing file and a missing anchor are reported, good ones are not."""
    (tmp_path / "a.md").write_text("# Title\n\n## Part one\n\n[ok](#part-one) [ok](b.md#b) [bad](#part-two) "
                                   "[bad](c.md)\n\n```\n# not a heading\n[not a link](nowhere.md)\n```\n")
    (tmp_path / "b.md").write_text("# B\n")
    found = broken_links(tmp_path / "a.md", root=tmp_path)
    assert len(found) == 2 and "#part-two" in found[0] and "c.md" in found[1], found


@pytest.mark.parametrize("doc", DOCS, ids=IDS)
def test_links_and_anchors_resolve(doc):
    problems = broken_links(doc)
    assert not problems, f"{doc.name}: broken links:\n" + "\n".join(problems)


def _refusal(overrides: List[str]):
    """None when ``load_config(None, overrides)`` accepts them, else its first line of refusal."""
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            load_config(None, overrides)
    except (Exception, SystemExit) as exc:  # noqa: BLE001 - any refusal is the finding
        return str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return None


@pytest.mark.parametrize("doc", DOCS, ids=IDS)
def test_overrides_are_accepted_by_the_config(doc):
    shown = sorted({(k, v.rstrip(".,;:")) for k, v in OVERRIDE.findall(doc.read_text())})
    assert shown or doc.name not in ("README.md", "configuration.md"), "the pattern found nothing"
    pairs = [f"{k}={v}" for k, v in shown if not (v in PLACEHOLDERS or (v.startswith("<") and v.endswith(">"))
                                                   or f"{k}={v}" in SHOWN_REFUSED)]
    together = _refusal(pairs)  # all at once (~0.1 s a load); one by one only to name the refused
    if together is None:
        return
    problems = [f"{kv}: {why}" for kv in pairs if (why := _refusal([kv])) is not None] or [f"together: {together}"]
    assert not problems, f"{doc.name} shows overrides the configuration refuses:\n" + "\n".join(problems)


def test_subcommands_exist():
    from lowmem_nablagfn.cli import build_parser

    known = set(build_parser()[1])
    command = re.compile(r"(?:lowmem-nablagfn|-m lowmem_nablagfn\.cli)\s+([a-z][\w-]*)")
    problems = [f"{doc.name}: lowmem-nablagfn {name}" for doc in DOCS for block in code(doc.read_text())
                for name in command.findall(block) if name not in known]
    assert not problems, f"no such subcommand (known: {sorted(known)}):\n" + "\n".join(problems)


def test_presets_exist():
    known = set(list_presets())
    preset = re.compile(r"(?:--preset|(?<![\w-])-p)[ =]([a-z0-9_]+)(?![\w:./])")  # not pytest's -p no:…
    problems = [f"{doc.name}: --preset {name}" for doc in DOCS for block in code(doc.read_text())
                for name in preset.findall(block) if name not in known]
    assert not problems, f"no such preset (known: {sorted(known)}):\n" + "\n".join(problems)


def test_named_paths_exist():
    """``python benchmarks/X.py``, ``bash launch/X``, ``configs/X.yaml``, ``tests/…``, ``lowmem_nablagfn/…``."""
    problems = []
    for doc in DOCS:
        for name in PATH.findall(doc.read_text()):
            name = name.rstrip(".")
            if not (ROOT / name).exists():
                problems.append(f"{doc.name}: {name}")
    assert not problems, "these paths do not exist in the checkout:\n" + "\n".join(sorted(set(problems)))
