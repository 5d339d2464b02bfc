"""User-facing errors: one clear line and a non-zero exit, never a deep traceback."""

from __future__ import annotations

import functools
import os
import sys
import traceback
import warnings
from collections.abc import Callable
from typing import NoReturn, TypeVar

F = TypeVar("F", bound=Callable)

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


class VillaError(Exception):
    """An error caused by the user's input or environment; its message is the whole story."""


class VillaWarning(UserWarning):
    """Input villa corrected and went on with (a box clipped to its image, a query truncated); its message is
    one line. Entry points print it as ``warning: <message>``."""


def print_villa_warnings() -> None:
    """From now on, print every :class:`VillaWarning` as one line ``warning: <message>`` on stderr (the entry
    points' form); other warnings keep Python's format."""
    original = warnings.showwarning
    if getattr(original, "_villa", False):
        return

    def show(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, VillaWarning):
            print(f"warning: {message}", file=sys.stderr if file is None else file, flush=True)
        else:
            original(message, category, filename, lineno, file, line)

    show._villa = True
    warnings.showwarning = show


def _under_torchrun() -> bool:
    # the environment only: no torch import for light entry points
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def _fail(message: str, line: str, code: int) -> NoReturn:
    """Print ``line``; under torchrun also stop every other rank of the job (see villa.engine.distributed)."""
    print(line, file=sys.stderr)
    if _under_torchrun():
        from villa.engine import distributed

        distributed.report_failure(message, code)
    sys.exit(code)


def run_entry(func: Callable, *args, **kwargs):
    """Run an entry point's body: a :class:`VillaError` prints ``error: <message>`` and exits with 2.

    Under torchrun, a failure on any rank (a VillaError, an interrupt, or any other exception, which keeps
    its traceback) ends the whole job within seconds, and a rank stopped by another's failure exits quietly
    instead of printing the broken-collective error it may hit meanwhile.
    """
    torchrun = _under_torchrun()
    if torchrun:
        from villa.engine import distributed

        distributed.watch_for_failures()
    try:
        return func(*args, **kwargs)
    except VillaError as err:
        _fail(str(err), f"error: {err}", EXIT_USAGE)
    except KeyboardInterrupt:
        _fail("interrupted", "interrupted", EXIT_INTERRUPTED)
    except Exception as err:
        if not torchrun:
            raise
        distributed.exit_if_peer_failed()
        traceback.print_exc()
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        distributed.report_failure(f"{type(err).__name__}: {first}".rstrip(": "), 1)


def exit_on_error(func: F) -> F:
    """Decorate an entry point with :func:`run_entry`."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        return run_entry(func, *args, **kwargs)

    return wrapper  # type: ignore[return-value]
