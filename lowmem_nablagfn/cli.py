"""``lowmem-nablagfn``: train | eval | export | report | profile | plan | presets | config — parse,
load the configuration, call one function.

Options and ``key=value`` overrides may come in any order.  Exit codes: 0 done; 1 the run stopped
(e.g. non-finite updates); 2 bad input, found before any model is built (configuration, preflight,
what to resume); 3 predicted not to fit the GPU; 130 interrupted (Ctrl-C); 141 output pipe closed.
"""
from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path
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


def _resume_value(argv: List[str]) -> List[str]:
    """``--resume`` takes an optional PATH but never an override: ``--resume key=value`` is ``--resume``
    followed by the override."""
    out = list(argv)
    for i, a in enumerate(out[:-1]):
        nxt = out[i + 1]
        if a == "--resume" and "=" in nxt and not nxt.startswith("-") and not Path(nxt).expanduser().exists():
            out[i] = "--resume=auto"
    return out


def _parse(parser: argparse.ArgumentParser, argv: List[str]) -> argparse.Namespace:
    """argparse, with overrides allowed anywhere (also after options, which argparse alone refuses)."""
    args, extra = parser.parse_known_args(argv)
    stray = [a for a in extra if a.startswith("-") or "=" not in a]
    if stray or (extra and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(stray or extra)}")
    if extra:
        args.overrides = list(args.overrides or []) + extra
    return args


def _is_main_process() -> bool:
    return int(os.environ.get("RANK", 0)) == 0


def _interrupted(argv: List[str], cfg) -> int:
    """One line after Ctrl-C: how far the run got and the command that continues it."""
    import json

    from . import checkpoint as ckpt

    if not _is_main_process():
        return 130
    if cfg is None:
        print("lowmem-nablagfn: interrupted", file=sys.stderr)
        return 130
    run_dir = Path(cfg.logging.output_dir) / cfg.logging.run_name
    done = None
    try:
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
        done = json.loads(lines[-1])["epoch"] if lines else None
    except (OSError, ValueError, KeyError):
        pass
    latest = ckpt.latest_checkpoint(run_dir)
    keep, skip = [], False
    for a in argv:  # the same command, with --resume instead of --resume PATH / --overwrite
        if skip:
            skip = False
        elif a == "--resume":
            skip = True
        elif not (a.startswith("--resume=") or a == "--overwrite" or a == "logging.overwrite=true"):
            keep.append(a)
    command = "lowmem-nablagfn " + shlex.join(keep + ["--resume"])
    where = "before its first epoch ended" if done is None else f"after epoch {done}"
    if latest is None:
        print(f"lowmem-nablagfn: interrupted {where}; no checkpoint yet: rerun the command to start again",
              file=sys.stderr)
    else:
        print(f"lowmem-nablagfn: interrupted {where} (latest checkpoint: {latest.name}); resume with: {command}",
              file=sys.stderr)
    return 130


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    state: dict = {}
    try:
        return _main(argv, state)
    except KeyboardInterrupt:
        return _interrupted(argv, state.get("cfg"))
    except BrokenPipeError:  # `lowmem-nablagfn help-config | head`: stop quietly
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141


def _check(args: argparse.Namespace, cfg) -> tuple:
    """Everything checked before a model is built, reported together: (the configuration's
    :class:`ConfigError` or None, preflight problems — files, directories, device, what to resume)."""
    from . import checkpoint as ckpt
    from . import preflight

    invalid = None
    try:
        validate(cfg)
    except ConfigError as exc:
        invalid = exc
    try:
        if args.command == "plan":
            return invalid, preflight.check_vram(args.vram)
        problems = preflight.check_config(cfg)
        if args.command == "train":
            try:
                ckpt.plan_run(cfg, args.resume)  # train() decides again; here to report it with the rest
            except ckpt.RunError as exc:
                problems.append(str(exc))
    except Exception:  # noqa: BLE001 - a check tripped over an invalid value: the validation error says it
        if invalid is None:
            raise
        problems = []
    return invalid, problems


def _main(argv: List[str], state: dict) -> int:
    from . import checkpoint as ckpt

    argv = _resume_value(_split_official(argv))
    parser = argparse.ArgumentParser(prog="lowmem-nablagfn", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p_train = sub.add_parser("train", help="finetune with residual ∇-DB (or no-flow)")
    _common(p_train)
    p_train.add_argument("--resume", nargs="?", const="auto", default=None,
                         help="continue the run from its latest checkpoint (or from PATH)")
    p_train.add_argument("--quiet", action="store_true", help="no progress bars")
    p_train.add_argument("--overwrite", action="store_true",
                         help="start afresh in a run directory with checkpoints, deleting them "
                              "(logging.overwrite=true)")
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
                        help="allocator fragmentation as a fraction of the peak (default 0.05 with "
                             "expandable segments, 0.15 without: planner.FRAGMENTATION)")
    p_plan.add_argument("--json", metavar="PATH", help="write the prediction as JSON")
    p_plan.add_argument("--verbose", action="store_true", help="report each traced probe")
    sub.add_parser("presets", help="list the presets")
    sub.add_parser("help-config", help="every configuration key with its default and meaning")
    from . import evaluate, export, report

    for module in (evaluate, export, report):
        module.add_parser(sub)  # eval | export | report: each parses its own flags, sets args.run_command
    args = _parse(parser, argv)

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
        overrides = list(args.overrides) + (["logging.quiet=true"] if getattr(args, "quiet", False) else []) \
            + (["logging.overwrite=true"] if getattr(args, "overwrite", False) else [])
        cfg = load_config(args.preset, overrides)
    except ConfigError as exc:
        print(f"lowmem-nablagfn: {exc}", file=sys.stderr)
        return 2
    state["cfg"] = cfg
    invalid, problems = _check(args, cfg)
    if invalid is not None or problems:
        print("\n".join(f"lowmem-nablagfn: {p}" for p in [invalid, *problems] if p is not None), file=sys.stderr)
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

    try:
        train(cfg, resume=args.resume)
    except ckpt.RunError as exc:  # e.g. a checkpoint damaged between the check and the load
        print(f"lowmem-nablagfn: {exc}", file=sys.stderr)
        return 2
    except ckpt.NonFiniteError as exc:
        if _is_main_process():
            print(f"lowmem-nablagfn: {exc}", file=sys.stderr)
        return 1
    return 0  # train() printed its summary (rank 0): results, where they are, next commands


if __name__ == "__main__":
    sys.exit(main())
