"""rocm-moe: info, sanity, run, diagnose, bench.

    rocm-moe info        what this machine has and which backends can run here (and why not)
    rocm-moe sanity      single-token single-expert suite; exits 1 on any failure
    rocm-moe run         the main job: an EPMoE of the Qwen3-30B-A3B MoE shape on seeded random
                         weights (or a checkpoint's MoE layer) over W ranks, checked against the
                         float64 oracle, with per-stage times per rank
    rocm-moe diagnose    find the first wrong stage of a pipeline and name the known bug class;
                         exits 0 clean, 1 a stage diverges, 2 a usage error
    rocm-moe bench comm     dispatch/combine GB/s of the comm backends against raw all_to_all_single
    rocm-moe bench experts  the Triton experts against their floor (a GPU)
    rocm-moe bench layer    a whole EPMoE forward, symm graph-replayed against torch eager (GPUs)

Several ranks: --world-size N spawns N processes on this host; under torchrun (any number of
nodes) every rank joins the group from torchrun's environment. Results go to stdout, progress
(ranks starting, iterations done) to stderr. A usage error prints one line and exits 2.
"""

from __future__ import annotations

import argparse
import sys

from rocm_moe.cli import bench, diagnose, info, run, sanity

COMMANDS = (info, sanity, run, diagnose, bench)  # one module per command, in --help order


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rocm-moe", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        command.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, TypeError) as exc:  # user errors: one clear line, no traceback
        print(f"rocm-moe {args.command}: error: {exc}", file=sys.stderr)
        return 2
