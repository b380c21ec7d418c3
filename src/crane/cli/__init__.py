"""Command-line entry point ``crane``: a thin layer over the library.

Each sub-module exposes ``register(subparsers)`` and sets ``func`` on its parsers;
the library itself never imports this package.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from crane.errors import CraneError, user_message

# Sub-command modules, imported lazily so ``crane --help`` stays fast.
_COMMAND_MODULES = ("crane.cli.datasets", "crane.cli.pipelines", "crane.cli.demo")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="crane",
        description="Crane / Crane+ zero-shot anomaly detection.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in _COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    _verbose_anywhere(parser)
    return parser


def _verbose_anywhere(parser: argparse.ArgumentParser) -> None:
    """``-v/--verbose`` after a command too (``crane predict ... --verbose``), as the error
    hint suggests: on every sub-command, set only when given there."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for p in action.choices.values():
                p.add_argument(
                    "-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                    help="debug logging",
                )  # fmt: skip
                _verbose_anywhere(p)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    # Our own messages at INFO; third-party libraries (open_clip logs on the root logger) only
    # from WARNING up unless --verbose.
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("crane").setLevel(logging.DEBUG if args.verbose else logging.INFO)
    try:
        if os.environ.get("CRANE_CPU_KERNELS"):  # a bad value fails now, not after the work
            from crane.models.kernels import get_cpu_kernels

            get_cpu_kernels()
        from tqdm.contrib.logging import logging_redirect_tqdm

        with logging_redirect_tqdm():  # (log lines above the progress bars, not through them)
            rc = int(args.func(args) or 0)
        sys.stdout.flush()  # (a closed pipe then fails here, not in the interpreter's exit)
        return rc
    except CraneError as exc:
        # Expected, user-facing failures: one clear paragraph, no traceback.
        print(f"crane: error: {user_message(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("crane: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader went away (`crane datasets list | head`): stop quietly. Python's advice:
        # point stdout at devnull so the flush at exit does not raise again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1
    except OSError as exc:
        # A folder that cannot be written, a file where a folder should be, a full disk ...:
        # the system's own message names the path; a traceback would add nothing for a user.
        if args.verbose:
            raise
        print(f"crane: error: {exc} (--verbose shows where)", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
