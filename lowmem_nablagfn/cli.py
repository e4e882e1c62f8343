"""``lowmem-nablagfn``: train | presets | config — parse, load the configuration, call one function."""
from __future__ import annotations

import argparse
import sys
from typing import List, Optional

from .config import ConfigError, field_docs, list_presets, load_config, to_dict, validate


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", "-p", default="tiny_cpu",
                   help=f"preset name in configs/ ({', '.join(list_presets())}) or a YAML path")
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
    p_check = sub.add_parser("config", help="print the resolved, validated configuration")
    _common(p_check)
    sub.add_parser("presets", help="list the presets")
    sub.add_parser("help-config", help="every configuration key with its default and meaning")
    args = parser.parse_args(argv)

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
    from .trainer import train

    run_dir = train(cfg, resume=args.resume)
    print(f"run directory: {run_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
