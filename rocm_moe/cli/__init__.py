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
nodes) every rank joins the group from torchrun's environment (checked first; a rendezvous that
nobody completes gives up after ROCM_MOE_RENDEZVOUS_TIMEOUT_S, 120 s). Results go to stdout,
progress (ranks starting, iterations done) to stderr. Every flag's number or path is checked
while the command line is parsed (rocm_moe.cli.argtypes), before any rank starts: argparse's
usage and one error line, exit 2. Any other usage error prints one line and exits 2.
"""

from __future__ import annotations

import argparse
import sys

from rocm_moe.cli import bench, diagnose, info, run, sanity
from rocm_moe.distributed import RendezvousTimeout

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
    except (ValueError, TypeError, RendezvousTimeout) as exc:  # one clear line, no traceback
        print(f"rocm-moe {args.command}: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
