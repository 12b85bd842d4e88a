"""The ``moe2edge`` command line.

Each subcommand lives in its own ``compile/cmd_<name>.py`` module exposing ``register(subparsers)``,
which adds its parser and sets ``func`` to a ``run(args) -> int`` that imports heavy backends lazily
(so ``moe2edge --help`` never imports torch). With no subcommand, ``moe2edge`` runs the main job
(``moe2edge demo``): the longest pipeline that works on a fresh machine.

One error path (``moe2edge.errors``): a user error (bad input, bad environment, a refused output) is
one line ``moe2edge CMD: error: ...`` and exit 2; a bad flag value is the same through argparse; an
unexpected exception is a bug and is said to be one (``internal error ... at FILE:LINE``, exit 1) rather
than passed off as the user's mistake. ``-v`` prints the traceback in both cases. SIGTERM cleans up
like Ctrl-C (temporary folders and half-written outputs are removed on the way out), exit 143.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import os
import signal
import sys
import threading
import traceback
from pathlib import Path

# Order = order in --help. A module missing here would be a packaging bug, so import errors surface.
COMMAND_MODULES = ["cmd_demo", "cmd_data", "cmd_teacher", "cmd_distill", "cmd_eval", "cmd_report", "cmd_embed", "cmd_compile", "cmd_export", "cmd_bench"]
_ROOT = Path(__file__).resolve().parents[1]


class Parser(argparse.ArgumentParser):
    """argparse with a one-line error (argparse would print the whole usage block first)."""

    def error(self, message):
        from moe2edge.errors import one_line

        self.exit(2, f"{self.prog}: error: {one_line(message)} (see {self.prog} --help)\n")


class Terminated(BaseException):
    """SIGTERM, raised in the main thread so that every ``finally`` / ``except BaseException`` cleans up
    (atomic_dir's temp folder, TemporaryDirectory's build folder) as for KeyboardInterrupt."""


def build_parser() -> argparse.ArgumentParser:
    p = Parser(
        prog="moe2edge",
        description=(
            "Distil Nomic-Embed-v2-style MoE text embedders into edge students and compile them "
            "to ONNX / OpenVINO / TensorRT. Run without a subcommand for the built-in end-to-end demo."
        ),
    )
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging, and tracebacks with errors")
    p.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    for name in COMMAND_MODULES:
        importlib.import_module(f"moe2edge.compile.{name}").register(sub)
    return p


@contextlib.contextmanager
def _sigterm_raises():
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise Terminated()

    old = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


@contextlib.contextmanager
def _integrity_env(skip: bool):
    """``--skip-integrity-check``: for this command and the subprocesses it starts (bench)."""
    from moe2edge._integrity import SKIP_ENV

    if not skip:
        yield
        return
    old = os.environ.get(SKIP_ENV)
    os.environ[SKIP_ENV] = "1"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(SKIP_ENV, None)
        else:
            os.environ[SKIP_ENV] = old


def _where(e: BaseException) -> str:
    """The innermost frame inside this project (else the innermost one): FILE:LINE in FUNC."""
    frames = traceback.extract_tb(e.__traceback__)
    if not frames:
        return "?"
    ours = [f for f in frames if Path(f.filename).resolve().is_relative_to(_ROOT) and "site-packages" not in f.filename]
    f = (ours or frames)[-1]
    path = Path(f.filename).resolve()
    shown = path.relative_to(_ROOT) if path.is_relative_to(_ROOT) else path
    return f"{shown}:{f.lineno} in {f.name}"


def error_message(e: BaseException) -> str:
    """The one line shown for a user error."""
    from moe2edge.errors import describe_os_error, one_line

    if isinstance(e, OSError) and not getattr(e, "__module__", "").startswith("moe2edge"):
        return one_line(describe_os_error(e))
    return one_line(str(e) or type(e).__name__)


def main(argv: list[str] | None = None) -> int:
    from moe2edge._malloc import tune_malloc

    tune_malloc()  # before torch starts threads: keeps long CPU runs from fragmenting memory
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    if args.command is None:  # bare `moe2edge` (global flags allowed) runs the main job
        args = parser.parse_args([*(sys.argv[1:] if argv is None else argv), "demo"])
    name = " ".join(["moe2edge", args.command] + [getattr(args, k) for k in ("data_command", "teacher_command")
                                                 if getattr(args, k, None)])
    with _sigterm_raises(), _integrity_env(getattr(args, "skip_integrity_check", False)):
        try:
            return int(args.func(args) or 0)
        except KeyboardInterrupt:
            print(f"{name}: interrupted (temporary files and folders were removed)", file=sys.stderr)
            return 130
        except Terminated:
            print(f"{name}: terminated (temporary files and folders were removed)", file=sys.stderr)
            return 128 + signal.SIGTERM
        except Exception as e:  # noqa: BLE001 - the one place that turns exceptions into messages
            from moe2edge.errors import is_user_error, one_line

            if args.verbose:
                traceback.print_exc()
            if is_user_error(e):
                print(f"{name}: error: {error_message(e)}", file=sys.stderr)
                return 2
            print(f"{name}: internal error (a bug in moe2edge, not in your input): {type(e).__name__}: "
                  f"{one_line(str(e), 300)} at {_where(e)}; rerun with -v for the traceback and please report it",
                  file=sys.stderr)
            return 1


if __name__ == "__main__":
    sys.exit(main())
