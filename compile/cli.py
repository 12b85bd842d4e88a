"""The ``moe2edge`` command line.

Each subcommand lives in its own ``compile/cmd_<name>.py`` module exposing ``register(subparsers)``,
which adds its parser and sets ``func`` to a ``run(args) -> int`` that imports heavy backends lazily
(so ``moe2edge --help`` never imports torch). With no subcommand, ``moe2edge`` runs the main job
(``moe2edge demo``): the longest pipeline that works on a fresh machine.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

# Order = order in --help. A module missing here would be a packaging bug, so import errors surface.
COMMAND_MODULES = ["cmd_demo", "cmd_data", "cmd_teacher", "cmd_distill", "cmd_eval", "cmd_report", "cmd_embed", "cmd_compile", "cmd_export", "cmd_bench"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="moe2edge",
        description=(
            "Distil Nomic-Embed-v2-style MoE text embedders into edge students and compile them "
            "to ONNX / OpenVINO / TensorRT. Run without a subcommand for the built-in end-to-end demo."
        ),
    )
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    p.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(f"moe2edge.compile.{name}").register(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    from moe2edge._malloc import tune_malloc

    tune_malloc()  # before torch starts threads: keeps long CPU runs from fragmenting memory
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    if args.command is None:  # bare `moe2edge` (global flags allowed) runs the main job
        args = parser.parse_args([*(sys.argv[1:] if argv is None else argv), "demo"])
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, ImportError, KeyError) as e:
        # User-facing errors (bad input, missing extra): one clear line, no traceback.
        if args.verbose:
            raise
        print(f"moe2edge {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
