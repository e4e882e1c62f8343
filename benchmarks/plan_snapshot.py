"""Every planner prediction and proposal the shipped traces give, as JSON, and the comparison of two
such snapshots: the check that a redesign of the planner or the memory plan changes no prediction.

For every preset whose architecture has a shipped trace (nothing is traced: a probe missing from it
is recorded as that error), eight variants of its memory and objective settings (as configured,
``memory.mode`` naive / official, no-flow, on-policy, chunks with checkpointing, every step stored in
bf16 and offloaded, ``device=cpu``), each also under the official schedule, and for GPU presets the
proposal for every card of ``planner.CARDS``: each prediction's phases, resident bytes, allowances,
work and notes (bytes rounded to 1 B).

    python benchmarks/plan_snapshot.py --out before.json           # before the change
    python benchmarks/plan_snapshot.py --out after.json --compare before.json
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lowmem_nablagfn.config import list_presets, load_config  # noqa: E402
from lowmem_nablagfn.planner import CARDS, Probes, official_baseline, predict, propose  # noqa: E402
from lowmem_nablagfn.planner.gpu import CARD_CAPABILITY  # noqa: E402

VARIANTS = ([], ["memory.mode=official"], ["memory.mode=naive"], ["model.no_flow=true"], ["training.on_policy=true"],
            ["memory.checkpoint_unet=true", "memory.input_grad_chunk=2", "memory.train_chunk=3"],
            ["memory.store_only_trained=false", "memory.transition_dtype=bf16", "memory.offload_trajectories=true"],
            ["device=cpu"])


def _pred(p) -> dict:
    return {"phases": {k: round(v) for k, v in p.phases.items()}, "order": list(p.phases),
            "resident": {k: round(v) for k, v in p.resident.items()}, "tflop": round(p.tflop_per_update, 9),
            "allowances": {k: round(v) for k, v in p.allowances.items()}, "notes": p.notes}


def _try(fn):
    try:
        return fn()
    except Exception as exc:  # a probe the shipped trace lacks, a variant the configuration refuses
        return f"ERR {type(exc).__name__}: {exc}"


def snapshot() -> dict:
    out = {}
    for name in list_presets():
        base = load_config(name)
        profile = _try(lambda: Probes(base, allow_trace=False))
        if isinstance(profile, str):
            out[name] = profile
            continue
        for v in VARIANTS:
            key = f"{name}|{' '.join(v)}"
            cfg = _try(lambda: load_config(name, v))
            out[key] = cfg if isinstance(cfg, str) else _try(lambda: _pred(predict(cfg, profile)))
            if not isinstance(cfg, str):
                out[key + "|official"] = _try(lambda: _pred(predict(official_baseline(cfg), profile)))
        if base.device != "cpu":
            for card, gib in CARDS.items():
                def one():
                    prop = propose(base, profile, gib, capability=CARD_CAPABILITY.get(card))
                    return None if prop is None else {"overrides": prop.overrides, "tier": prop.tier,
                                                      "prediction": _pred(prop.prediction)}
                out[f"{name}|propose|{card}"] = _try(one)
    return out


def compare(old: dict, new: dict) -> list:
    """Keys whose value differs (a key that was an error before is compared too: errors must stay)."""
    return [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="write the snapshot here (JSON)")
    ap.add_argument("--compare", help="an earlier snapshot: print every difference, exit 1 if any")
    args = ap.parse_args()
    snap = snapshot()
    Path(args.out).write_text(json.dumps(snap, indent=1, sort_keys=True))
    values = [v for v in snap.values() if not isinstance(v, str)]
    print(f"{len(values)} predictions/proposals ({len(snap) - len(values)} errors recorded) -> {args.out}")
    if args.compare:
        diff = compare(json.loads(Path(args.compare).read_text()), snap)
        for k in diff:
            print(f"differs: {k}")
        print(f"{len(diff)} of {len(snap)} differ from {args.compare}")
        return 1 if diff else 0
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
