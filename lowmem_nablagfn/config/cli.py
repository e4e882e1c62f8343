"""``lowmem-nablagfn config | presets | help-config`` (the contract of :mod:`lowmem_nablagfn.cli`), and
:func:`add_config_arguments`, the options of every subcommand that reads a configuration."""
from __future__ import annotations

import argparse

from .loading import field_docs, list_presets, to_dict


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """``--preset`` and the dotted ``key=value`` overrides.  The CLI loads and checks the configuration
    of a subcommand with these options before its ``run``, and hands it over as ``args.cfg``."""
    parser.add_argument("--preset", "-p", default="tiny_cpu",
                        help=f"preset name in configs/ ({', '.join(list_presets())}) or a YAML path")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="dotted overrides, e.g. model.reward_scale=1e4 (official --config.x.y=v accepted)")
    parser.set_defaults(reads_config=True)


def add_parser(subparsers) -> None:
    add_config_arguments(subparsers.add_parser("config", help="print the resolved, validated configuration"))
    subparsers.add_parser("presets", help="list the presets")
    subparsers.add_parser("help-config", help="every configuration key with its default and meaning")


def run(args: argparse.Namespace) -> int:
    if args.command == "presets":
        print("\n".join(list_presets()))
    elif args.command == "help-config":
        for key, default, doc in field_docs():
            print(f"{key} = {default!r}\n    {doc}")
    else:  # config: args.cfg is loaded and valid
        from omegaconf import OmegaConf

        print(OmegaConf.to_yaml(to_dict(args.cfg)))
    return 0
