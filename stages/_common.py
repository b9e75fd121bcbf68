"""Glue shared by the stage scripts: one-line errors, metric files."""

from __future__ import annotations

import functools
import json
import os
import sys
from pathlib import Path
from typing import Any, Callable

from diffusion_core.errors import USER_ERRORS, DataError


# Set to 1 for the full traceback of an unexpected failure instead of its one-line summary.
DEBUG_ENV = "DIFFUSION_DEBUG"


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:500] if text else type(exc).__name__


def one_line_errors(fn: Callable) -> Callable:
    """Expected user errors -> ``error: <message>`` on stderr, exit status 2. Any other exception ->
    ``error: <stage>: <type>: <message>``, exit status 1 (the traceback with ``DIFFUSION_DEBUG=1``)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except USER_ERRORS as exc:
            print(f"error: {first_line(exc)}", file=sys.stderr)
            raise SystemExit(2) from None
        except Exception as exc:  # noqa: BLE001 - the last line of defence: one line, not a traceback
            if os.environ.get(DEBUG_ENV, "") not in ("", "0"):
                raise
            stage = fn.__module__.rpartition(".")[2]
            print(f"error: {stage}: {type(exc).__name__}: {first_line(exc)} (set {DEBUG_ENV}=1 for the traceback)", file=sys.stderr)
            raise SystemExit(1) from None

    return wrapper


def write_json(path: str | Path, data: dict[str, Any]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def read_json(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        raise DataError(f"{path}: missing or not valid JSON (run the stage that writes it)") from None
