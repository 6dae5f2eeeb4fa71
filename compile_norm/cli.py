"""The ``compile-norm`` command line tool."""

from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="compile-norm",
        description="compile_norm: RMSNorm-family fusion for torch.compile",
    )
    parser.add_argument("--version", action="version", version=f"compile-norm {__version__}")
    sub = parser.add_subparsers(dest="command")
    providers = sub.add_parser("providers", help="list each op's kernel providers and their order")
    providers.set_defaults(func=_cmd_providers)
    from .inspect.command import add_parser as add_inspect_parser

    add_inspect_parser(sub)
    return parser


def _cmd_providers(args: argparse.Namespace) -> int:
    from .ops import registry

    for name in sorted(registry.ops()):
        order = [p.name for p in registry.chain(name)]
        missing = registry.unsupported_reasons(name)
        line = f"{name:40s} {' > '.join(order)}"
        if missing:
            line += "   (unavailable: " + "; ".join(f"{n}: {r}" for n, r in missing.items()) + ")"
        print(line)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
