"""Progress bars (tqdm) that stay readable in logs: redrawn often on a terminal, every 10 s otherwise."""

from __future__ import annotations

import sys

from tqdm.auto import tqdm


def progress_bar(iterable=None, **kwargs):
    kwargs.setdefault("mininterval", 0.1 if sys.stderr.isatty() else 10.0)
    kwargs.setdefault("dynamic_ncols", True)
    return tqdm(iterable, **kwargs)
