"""Running a module's ``_check_*`` functions on every spawned rank, one result per check.

Spawning ranks takes seconds, so a test module launches once per world size and runs all its
checks inside; each check becomes its own pytest test through the results."""

from __future__ import annotations

import traceback


def collect_checks(namespace: dict, skip: tuple[str, ...] = ()) -> dict:
    return {name[len("_check_"):]: fn for name, fn in namespace.items()
            if name.startswith("_check_") and name[len("_check_"):] not in skip}


def run_checks(checks: dict, info, seed: int) -> dict:
    """{check: {"ok": bool, "value": return value or traceback}} on this rank."""
    results = {}
    for name, fn in checks.items():
        try:
            results[name] = {"ok": True, "value": fn(info, seed)}
        except Exception:
            results[name] = {"ok": False, "value": traceback.format_exc()}
    return results
