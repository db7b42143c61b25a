"""rocm-moe info: versions, the device, which backends can run here (and why not), the ones run,
sanity, diagnose and bench layer pick here when --comm / --experts are not given, and every
ROCM_MOE_* variable with its value here (exit status 1 when one of them holds a value its owner
refuses)."""

from __future__ import annotations

import argparse
import platform
import sys

import torch
from rich.table import Table
from rich.text import Text

from rocm_moe import __version__, backends, env
from rocm_moe._console import console
from rocm_moe._libs import library_version
from rocm_moe.cli import ranks
from rocm_moe.cli.spec import FP8_COMM, LayerSpec

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
    for base, name in FP8_COMM.items():  # FP8 checkpoints' rows in FP8 (the fp8_dtype wire)
        reason = backends.BACKENDS[f"comm:{base}"].availability()
        table.add_row("comm", f"{name} (--comm {base} --fp8-dispatch)",
                      "usable" if reason is None else f"unavailable: {reason}")
    console.print(table)
    console.print(defaults_table())
    console.print(memory_table())
    console.print(mori_launch_table())
    libs = Table(title="optional libraries")
    for col in ("library", "version"):
        libs.add_column(col)
    for lib in OPTIONAL_LIBRARIES:
        libs.add_row(lib, library_version(lib) or "not installed")
    console.print(libs)
    console.print(environment_table())
    bad = env.problems()
    for line in bad:  # on stderr too, so that a deployment script sees why info failed
        print(line, file=sys.stderr)
    return 1 if bad else 0


def environment_table() -> Table:
    """Every ROCM_MOE_* variable (``rocm_moe.env``): its value here, or what holds while it is
    unset, and what it changes; a value its owner refuses shows the owner's error."""
    table = Table(title="environment (ROCM_MOE_*; docs: each variable's page)")
    for col in ("variable", "here", "changes"):
        table.add_column(col)
    for var, value, verdict in env.settings():
        here = Text(f"unset ({var.unset})" if value is None else repr(value))
        if verdict is not None and verdict.startswith("not checked"):
            here.append(f": {verdict}")
        elif verdict is not None:
            here.append(" REFUSED", style="red")
            here.append(f": {verdict}")
        table.add_row(var.name, here, var.effect)
    return table


def default_rows() -> list[tuple[str, str, str, str]]:
    """(ranks, device, comm, experts) of the ranks a command would start here when --comm /
    --experts are not given, each backend with its reason, chosen from the device the ranks run
    on (``LayerSpec.on_rank``): one rank in this process, the default spawned ranks, and on a
    GPU host CPU ranks (--device cpu, or more ranks than GPUs) and ranks across hosts."""
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    W = ranks.world_size(None)  # --world-size's default: torchrun's, a rank per GPU, or 2
    cases = [("1 (--world-size 1)", 1, ranks.device("auto"), False)]
    if W > 1:
        on_gpus = ranks.spawn_backend(W) == "nccl"
        cases.append((f"{W} spawned ({'NCCL, a GPU each' if on_gpus else 'gloo'})", W,
                      torch.device("cuda" if on_gpus else "cpu"), False))
    if gpus:
        cases.append((f"{max(2, gpus + 1)} spawned, or --device cpu (gloo)", max(2, gpus + 1),
                      torch.device("cpu"), False))
        cases.append(("torchrun across hosts (NCCL)", 2 * gpus, torch.device("cuda"), True))
    spec = LayerSpec(num_experts=8, hidden_size=8, intermediate_size=8, top_k=1)  # dtype auto
    rows = []
    for label, world, device, multi in cases:
        experts = backends.default_experts(device, dtype=spec.torch_dtype(device))
        comm = backends.default_comm(world, device, multi)
        rows.append((label, device.type, f"{comm[0]} ({comm[1]})", f"{experts[0]} ({experts[1]})"))
    return rows


def defaults_table() -> Table:
    table = Table(title="defaults here (without --comm / --experts; dtype auto)")
    for col in ("ranks", "device", "comm", "experts"):
        table.add_column(col)
    for row in default_rows():
        table.add_row(*row)
    return table


def memory_table() -> Table:
    """Comm memory per GPU of the one dispatcher every MoE layer of a model shares
    (``rocm_moe.comm.pool``): the whole model's, whatever its layer count."""
    from rocm_moe.comm.pool import human_bytes, memory_rows

    rows = memory_rows()
    table = Table(title=f"comm memory per GPU for the whole model (one dispatcher shared by "
                  f"every MoE layer; bf16 rows, {rows[0]['tokens_per_rank']} tokens per rank, "
                  "linear in it; torch/local: none reserved)")
    for col in ("model", "EP", "symm buffer", "MORI heap"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(r["model"], str(r["ep"]), human_bytes(r["symm"]), human_bytes(r["mori"]))
    return table


def mori_launch_table() -> Table:
    """How MORI will launch its kernels here (``comm.mori.launch_description``): AUTO mode with
    its tuned MI300X tables unless MORI_EP_LAUNCH_CONFIG_MODE says otherwise."""
    from rocm_moe.comm.mori import launch_description

    table = Table(title="MORI launch configuration (--comm mori)")
    for col in ("kernel type", "EP", "launch"):
        table.add_column(col)
    for kernel_type, ep in (("IntraNode", 2), ("IntraNode", 4), ("IntraNode", 8),
                            ("IntraNodeLL", 8), ("InterNodeV1", 16), ("InterNodeV1LL", 16)):
        try:
            text = launch_description(kernel_type, ep)
        except ValueError as exc:  # a bad MORI_EP_LAUNCH_CONFIG_MODE: say so, info goes on
            text = str(exc).splitlines()[0]
        table.add_row(kernel_type, str(ep), text)
    return table
