"""Glue shared by the stage scripts: one-line errors, metric files."""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path
from typing import Any, Callable

from diffusion_core.errors import USER_ERRORS, DataError


def one_line_errors(fn: Callable) -> Callable:
    """Turn expected user errors into ``error: <message>`` on stderr and exit status 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except USER_ERRORS as exc:
            msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            print(f"error: {msg}", file=sys.stderr)
            raise SystemExit(2) from None

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
