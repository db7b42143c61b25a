"""Benchmarks runnable as `rocm-moe bench NAME` (scripts in bench/ call the same code)."""

from __future__ import annotations

import datetime
import itertools
import json
from pathlib import Path


def pyplot():
    """matplotlib.pyplot on a file-only backend, or None when matplotlib is not installed."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def rotations(call, sets: list[tuple]):
    """A callable that calls ``call(*sets[i])`` for i = 0, 1, 2, ... in turn: a CUDA graph of
    several calls records each call's own set, so timed calls cycle through inputs that would
    otherwise stay in the cache (decode and experts benchmarks' ``--batches``)."""
    turn = itertools.count()
    return lambda: call(*sets[next(turn) % len(sets)])


NO_PLOT = "matplotlib is not installed: no plot (pip install 'rocm_moe[bench]')"


def cell(v, *, small_digits: int = 2) -> str:
    """A summary value as a table cell: None as '-', a float below 10 with ``small_digits``
    decimals and any other float with one, the rest as ``str``: ``cell(0.8081) == '0.81'``,
    ``cell(121.73) == '121.7'``, ``cell(None) == '-'``."""
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{small_digits}f}" if v < 10 else f"{v:.1f}"
    return str(v)


def print_rows(console, rows: list[dict], *, title: str, small_digits: int = 2) -> None:
    """One rich table of summary ``rows`` (dicts with the same keys): a right-aligned column
    per key of the first row, each value through ``cell``."""
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    for c in rows[0]:
        table.add_column(c, justify="right")
    for r in rows:
        table.add_row(*[cell(v, small_digits=small_digits) for v in r.values()])
    console.print(table)


def write_json(out: str | Path, stem: str, *, device: str, **fields) -> Path:
    """Write ``OUT/STEM.json`` (the folder made if missing) with the UTC date, ``device``,
    torch's version and ``fields``, in that order; returns its path."""
    import torch

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{stem}.json"
    path.write_text(json.dumps(dict(
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(), device=device,
        torch=torch.__version__, **fields), indent=1))
    return path
