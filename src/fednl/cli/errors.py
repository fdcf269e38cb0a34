"""Turn user-facing errors into one clear line on stderr and a non-zero exit (no traceback)."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator

import typer

# Exceptions that describe bad input (config, data file, checkpoint, client update, missing model).
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError, KeyError, OSError)


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    try:
        yield
    except USER_ERRORS as exc:  # noqa: PERF203
        msg = exc.args[0] if (isinstance(exc, KeyError) and exc.args) else str(exc)
        print(f"error: {msg}", file=sys.stderr)
        raise typer.Exit(code=2) from None


def register(app: typer.Typer) -> None:  # this module adds no command
    del app
