"""User-facing errors: one clear line and a non-zero exit, never a deep traceback."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import TypeVar

F = TypeVar("F", bound=Callable)

EXIT_USAGE = 2


class VillaError(Exception):
    """An error caused by the user's input or environment; its message is the whole story."""


def exit_on_error(func: F) -> F:
    """Decorate an entry point so a :class:`VillaError` prints ``error: <message>`` and exits with 2."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except VillaError as err:
            print(f"error: {err}", file=sys.stderr)
            sys.exit(EXIT_USAGE)
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            sys.exit(130)

    return wrapper  # type: ignore[return-value]
