"""argparse ``type=`` functions shared by every command: numbers and paths are checked while the
command line is parsed, before any rank starts, so a bad flag ends in argparse's one line
("argument --iters: value='0': must be an integer >= 1. Fix: ...") and exit code 2 instead of a
crash in a rank or after the whole run.

    positive_int, nonnegative_int, seed_int, shared_intermediate
    finite_positive_float, finite_nonnegative_float, fraction
    writable_file (an output file), output_dir (a folder made if missing), existing_dir,
    file_stem (a file name without folder)

and ``Given``, an ``action=`` that stores the value and records that the flag was on the
command line (``given(args)``), for flags whose default cannot tell "not given" apart.
"""

from __future__ import annotations

import argparse
import math
import os
from pathlib import Path

from rocm_moe._checks import error_message


def _bad(text: str, rule: str, fix: str) -> argparse.ArgumentTypeError:
    return argparse.ArgumentTypeError(error_message("value", repr(text), rule, fix))


def _int(text: str, minimum: int, fix: str, maximum: int | None = None) -> int:
    try:
        value = int(text)
    except ValueError:
        raise _bad(text, "must be an integer", fix) from None
    if value < minimum or (maximum is not None and value > maximum):
        rule = f"must be an integer >= {minimum}" + ("" if maximum is None else f" and <= "
                                                     f"{maximum}")
        raise _bad(text, rule, fix)
    return value


def positive_int(text: str) -> int:
    """An integer >= 1 (sizes, counts, iterations)."""
    return _int(text, 1, "pass 1 or more")


def nonnegative_int(text: str) -> int:
    """An integer >= 0 (warm-up iterations, a layer index)."""
    return _int(text, 0, "pass 0 or more")


def seed_int(text: str) -> int:
    """A random seed: an integer in [0, 2**32)."""
    return _int(text, 0, "pass a seed in [0, 4294967295]", maximum=2**32 - 1)


def shared_intermediate(text: str) -> int:
    """The shared experts' intermediate size: >= 1; no flag means no shared experts."""
    return _int(text, 1, "omit the flag for no shared experts")


def _float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise _bad(text, "must be a number", "pass a finite number") from None
    if not math.isfinite(value):
        raise _bad(text, "must be finite (not nan or inf)", "pass a finite number")
    return value


def finite_positive_float(text: str) -> float:
    """A finite number > 0 (a rate, a scale)."""
    value = _float(text)
    if value <= 0:
        raise _bad(text, "must be > 0", "pass a positive number")
    return value


def finite_nonnegative_float(text: str) -> float:
    """A finite number >= 0 (a latency, a strength where 0 means none)."""
    value = _float(text)
    if value < 0:
        raise _bad(text, "must be >= 0", "pass 0 or a positive number")
    return value


def fraction(text: str) -> float:
    """A finite number in (0, 1] (an efficiency)."""
    value = _float(text)
    if not 0 < value <= 1:
        raise _bad(text, "must lie in (0, 1]", "pass e.g. 0.8")
    return value


def _name_max(folder: Path) -> int:
    try:
        return os.pathconf(folder, "PC_NAME_MAX")
    except (OSError, ValueError, AttributeError):
        return 255


def _check_names(text: str, path: Path, existing: Path) -> None:
    limit = _name_max(existing)
    for part in path.parts:
        if len(part.encode()) > limit:
            raise _bad(text, f"holds a name of {len(part.encode())} bytes, this file system "
                       f"allows {limit}", "pass a shorter name")


def _exists(path: Path) -> bool:
    try:
        return path.exists()
    except OSError:  # a name too long, a loop of links
        return False


def _existing_ancestor(path: Path) -> Path:
    """The nearest path above ``path`` (or itself) that exists (a file or a folder)."""
    for parent in (path, *path.parents):
        if _exists(parent):
            return parent
    return Path(path.anchor or ".")


def writable_file(text: str) -> str:
    """An output file: not a folder, in an existing writable folder, names within the file
    system's limit. Checked here, not after the run that writes it."""
    path = Path(text).expanduser().absolute()
    fix = "pass a file path in an existing, writable folder"
    existing = _existing_ancestor(path)
    _check_names(text, path, existing if existing.is_dir() else existing.parent)
    if not text or path.is_dir():
        raise _bad(text, "is a folder, not a file", fix)
    folder = path.parent
    if not folder.is_dir() or not os.access(folder, os.W_OK | os.X_OK):
        raise _bad(text, f"its folder {folder} does not exist or is not writable", fix)
    return text


def output_dir(text: str) -> str:
    """An output folder, made if missing: nothing on its path may be a file, and the nearest
    existing folder must be writable."""
    path = Path(text).expanduser().absolute()
    fix = "pass a folder path (it is made if missing) under a writable folder"
    existing = _existing_ancestor(path)
    _check_names(text, path, existing if existing.is_dir() else existing.parent)
    if not existing.is_dir():
        raise _bad(text, f"{existing} is a file, not a folder", fix)
    if not os.access(existing, os.W_OK | os.X_OK):
        raise _bad(text, f"{existing} is not writable", fix)
    return text


def existing_dir(text: str) -> str:
    """An input folder that exists."""
    if not Path(text).expanduser().is_dir():
        raise _bad(text, "is not an existing folder", "pass the folder's path")
    return text


def file_stem(text: str) -> str:
    """A file name without a folder (the stem of output files)."""
    if not text or "/" in text or text in (".", "..") or "\0" in text:
        raise _bad(text, "must be a plain file name (no '/')", "pass a name like run1")
    if len(text.encode()) > 200:  # room for the suffixes (.json, .png, .rank<r>...)
        raise _bad(text, f"is {len(text.encode())} bytes long, at most 200", "pass a shorter "
                   "name")
    return text


class Given(argparse.Action):
    """Stores the value as argparse's default action does, and records the flag (its first
    option string) in the namespace, read back with ``given``: a command can then refuse a
    flag given with another one that overrides it (``--router`` with ``--checkpoint``), even
    where the value given equals the default."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, values)
        flags = set(getattr(namespace, "_given", ()))
        flags.add(self.option_strings[0])
        namespace._given = sorted(flags)  # (a list: commands write vars(args) as JSON)


def given(args: argparse.Namespace) -> frozenset[str]:
    """The ``Given`` flags that were on the command line."""
    return frozenset(getattr(args, "_given", ()))
