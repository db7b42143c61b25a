"""Whether an optional library imports here, probed once per process."""

from __future__ import annotations

import functools
import importlib
import importlib.util


@functools.cache
def library_version(name: str) -> str | None:
    """Installed version of a library, or None if it cannot be imported."""
    if importlib.util.find_spec(name) is None:
        return None
    try:
        mod = importlib.import_module(name)
    except Exception:  # a broken install is reported as not importable
        return None
    return str(getattr(mod, "__version__", "installed"))
