"""``lowmem-nablagfn``: train | eval | export | report | profile | plan | presets | config — parse,
load the configuration, call one function."""
from __future__ import annotations

import argparse
import sys
from typing import List, Optional

from .config import ConfigError, field_docs, list_presets, load_config, to_dict, validate


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", "-p", default="tiny_cpu",
                   help=f"preset name in lowmem_nablagfn/configs/ ({', '.join(list_presets())}) or a YAML path")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="dotted overrides, e.g. model.reward_scale=1e4 (official --config.x.y=v accepted)")


def _split_official(argv: List[str]) -> List[str]:
    """Turn ``--config.a.b=v`` / ``--seed=0`` / ``--exp_name=x`` (official flags) into positionals."""
    out = []
    for a in argv:
        if a.startswith("--config.") or a.startswith("--seed=") or a.startswith("--exp_name="):
            out.append(a.lstrip("-"))
        elif a.startswith("--config="):
            out += ["--preset", a.split("=", 1)[1]]
        else:
            out.append(a)
    return out


def main(argv: Optional[List[str]] = None) -> int:
    argv = _split_official(list(sys.argv[1:] if argv is None else argv))
    parser = argparse.ArgumentParser(prog="lowmem-nablagfn", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p_train = sub.add_parser("train", help="finetune with residual ∇-DB (or no-flow)")
    _common(p_train)
    p_train.add_argument("--resume", nargs="?", const="auto", default=None,
                         help="continue the run from its latest checkpoint (or from PATH)")
    p_train.add_argument("--quiet", action="store_true", help="no progress bars")
    p_train.add_argument("--force", action="store_true",
                         help="train even if the planner predicts the configuration does not fit the GPU")
    p_check = sub.add_parser("config", help="print the resolved, validated configuration")
    _common(p_check)
    p_prof = sub.add_parser("profile", help="run a few updates; per-phase peak memory, time, throughput")
    _common(p_prof)
    p_prof.add_argument("--updates", type=int, default=2, help="recorded updates (after --warmup)")
    p_prof.add_argument("--warmup", type=int, default=1, help="unrecorded warm-up rounds")
    p_prof.add_argument("--trace", metavar="DIR", help="also write a torch.profiler trace to DIR/trace.json")
    p_prof.add_argument("--json", metavar="PATH", help="write the result here (default RUN_DIR/profile.json)")
    p_prof.add_argument("--compare-plan", action="store_true", help="show the planner's prediction per phase")
    p_prof.add_argument("--results", metavar="PATH", help="markdown file to append to (default benchmarks/RESULTS.md)")
    p_prof.add_argument("--no-results", action="store_true", help="do not append to a results file")
    p_plan = sub.add_parser("plan", help="predict peak memory phase by phase (no GPU needed); propose settings")
    _common(p_plan)
    p_plan.add_argument("--vram", help="card memory (24GB, 16000MB) or name (RTX4090-24, A100-80, ...); "
                                       "default: this machine's GPU, if any")
    p_plan.add_argument("--table", action="store_true", help="markdown table: every GPU preset x card")
    p_plan.add_argument("--headroom", type=float, default=None,
                        help="allocator fragmentation as a fraction of the peak (default 0.10)")
    p_plan.add_argument("--json", metavar="PATH", help="write the prediction as JSON")
    p_plan.add_argument("--verbose", action="store_true", help="report each traced probe")
    sub.add_parser("presets", help="list the presets")
    sub.add_parser("help-config", help="every configuration key with its default and meaning")
    from . import evaluate, export, report

    for module in (evaluate, export, report):
        module.add_parser(sub)  # eval | export | report: each parses its own flags, sets args.run_command
    args = parser.parse_args(argv)

    if getattr(args, "run_command", None) is not None:
        return args.run_command(args)
    if args.command == "presets":
        print("\n".join(list_presets()))
        return 0
    if args.command == "help-config":
        for key, default, doc in field_docs():
            print(f"{key} = {default!r}\n    {doc}")
        return 0
    try:
        overrides = list(args.overrides) + (["logging.quiet=true"] if getattr(args, "quiet", False) else [])
        cfg = validate(load_config(args.preset, overrides))
    except ConfigError as exc:
        print(f"lowmem-nablagfn: {exc}", file=sys.stderr)
        return 2
    if args.command == "config":
        from omegaconf import OmegaConf

        print(OmegaConf.to_yaml(to_dict(cfg)))
        return 0
    if args.command == "profile":
        from . import profiler

        args.command_line = None
        return profiler.main(cfg, args)
    if args.command == "plan":
        from . import planner

        return planner.main(cfg, args)
    if not args.force:  # on CUDA: refuse a configuration predicted not to fit (CPU: no check)
        from . import planner

        refusal = planner.preflight(cfg)
        if refusal is not None:
            print(f"lowmem-nablagfn: {refusal}", file=sys.stderr)
            return 3
    from .trainer import train

    run_dir = train(cfg, resume=args.resume)
    from .distributed import is_main

    if is_main():  # one line per job, not per rank
        print(f"run directory: {run_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
