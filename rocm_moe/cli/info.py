"""rocm-moe info: versions, the device, and which backends can run here (and why not)."""

from __future__ import annotations

import argparse
import importlib
import platform

import torch
from rich.table import Table

from rocm_moe import __version__, backends
from rocm_moe._console import console
from rocm_moe._libs import library_version
from rocm_moe.cli.spec import FP8_COMM

OPTIONAL_LIBRARIES = ("triton", "mori", "aiter", "transformers", "safetensors", "matplotlib")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("info", help="machine, torch, and which backends run here",
                       description=__doc__)
    p.set_defaults(func=command)


def command(args: argparse.Namespace) -> int:
    console.print(f"rocm_moe {__version__}, torch {torch.__version__}, "
                  f"Python {platform.python_version()}, device: {backends.device_description()}")
    table = Table(title="backends")
    for col in ("kind", "name", "status"):
        table.add_column(col)
    for b in backends.BACKENDS.values():
        reason = b.availability()
        table.add_row(b.kind, b.name, "usable" if reason is None else f"unavailable: {reason}")
    for base, (name, module, cls) in FP8_COMM.items():  # FP8 checkpoints' rows in FP8
        reason = getattr(importlib.import_module(module), cls).availability()
        table.add_row("comm", f"{name} (--comm {base} --fp8-dispatch)",
                      "usable" if reason is None else f"unavailable: {reason}")
    console.print(table)
    libs = Table(title="optional libraries")
    for col in ("library", "version"):
        libs.add_column(col)
    for lib in OPTIONAL_LIBRARIES:
        libs.add_row(lib, library_version(lib) or "not installed")
    console.print(libs)
    return 0
