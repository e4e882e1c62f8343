"""``lowmem-nablagfn``: train | eval | export | report | profile | plan | presets | config | help-config | doctor —
parse, load the configuration, call one function.

Options and ``key=value`` overrides may come in any order.  Exit codes: 0 done; 1 the run stopped
(non-finite updates, or the reward-hacking monitor under ``monitor.stop``); 2 bad input, found before
any model is built (configuration, set-up checks, what to resume) or when set-up fails (one line, no
traceback); 3 predicted not to fit the GPU; 130 interrupted (Ctrl-C); 141 output pipe closed.

Each subcommand lives in its own module (:data:`SUBCOMMANDS`), which provides
``add_parser(subparsers) -> None`` (its flags) and ``run(args) -> int`` (its exit code).  A subcommand
whose parser has the configuration options (:func:`~lowmem_nablagfn.config.add_config_arguments`)
gets its configuration loaded, validated and checked here, as ``args.cfg``, before its ``run``.
This module keeps only what all of them share: the argument pre-processing, overrides anywhere,
exit codes, Ctrl-C and closed pipes.
"""
from __future__ import annotations

import argparse
import importlib
import os
import shlex
import sys
from pathlib import Path
from typing import Dict, List, Optional

from .config import ConfigError, load_config, validate

#: Set to 1 to see the traceback behind a one-line set-up error.
TRACEBACK_ENV = "LOWMEM_NABLAGFN_TRACEBACK"

#: The subcommand modules, in the order ``--help`` lists their commands.
SUBCOMMANDS = ("trainer", "config.cli", "profiler", "planner.cli", "evaluate", "export", "report", "doctor")


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


def build_parser() -> tuple:
    """(the parser, {command name: the module that runs it})."""
    parser = argparse.ArgumentParser(prog="lowmem-nablagfn", description=__doc__.split("\n\nEach subcommand")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    owners: Dict[str, object] = {}
    for name in SUBCOMMANDS:
        module = importlib.import_module(f"{__package__}.{name}")
        known = set(sub.choices)
        module.add_parser(sub)
        owners.update((command, module) for command in set(sub.choices) - known)
    return parser, owners


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
    :class:`ConfigError` or None, set-up problems (lowmem_nablagfn.checks) — files, directories, device, what to resume)."""
    from . import checkpoint as ckpt
    from . import checks

    invalid = None
    try:
        validate(cfg)
    except ConfigError as exc:
        invalid = exc
    try:
        if args.command == "plan":
            return invalid, checks.check_vram(args.vram)
        if args.command == "config":  # printing a configuration needs no model, files or device
            return invalid, []
        problems = checks.check_config(cfg)
        if args.command == "train":
            try:
                ckpt.decide_start(cfg, args.resume)  # train() decides again; here to report it with the rest
            except ckpt.RunError as exc:
                problems.append(str(exc))
    except Exception:  # noqa: BLE001 - a check tripped over an invalid value: the validation error says it
        if invalid is None:
            raise
        problems = []
    return invalid, problems


def _main(argv: List[str], state: dict) -> int:
    from . import checkpoint as ckpt
    from .checks import SetupError

    parser, owners = build_parser()
    args = _parse(parser, _resume_value(_split_official(argv)))
    if getattr(args, "reads_config", False):
        try:  # flags that stand for overrides (train --quiet / --overwrite) come after the typed ones
            cfg = load_config(args.preset, list(args.overrides) + list(getattr(args, "flag_overrides", None) or []))
        except ConfigError as exc:
            print(f"lowmem-nablagfn: {exc}", file=sys.stderr)
            return 2
        state["cfg"] = args.cfg = cfg
        invalid, problems = _check(args, cfg)
        if invalid is not None or problems:
            print("\n".join(f"lowmem-nablagfn: {p}" for p in [invalid, *problems] if p is not None),
                  file=sys.stderr)
            return 2
    try:
        return owners[args.command].run(args)
    except (ckpt.RunError, SetupError) as exc:  # e.g. a checkpoint damaged between the check and the load
        print(f"lowmem-nablagfn: {exc}", file=sys.stderr)
        if isinstance(exc, SetupError):  # one line for the user; the whole story for a bug report
            if os.environ.get(TRACEBACK_ENV, "") not in ("", "0"):
                import traceback

                traceback.print_exception(exc.__cause__ or exc, file=sys.stderr)
            else:
                print(f"lowmem-nablagfn: ({TRACEBACK_ENV}=1 prints the traceback)", file=sys.stderr)
        return 2
    except ckpt.NonFiniteError as exc:
        if _is_main_process():
            print(f"lowmem-nablagfn: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
