"""rocm-moe bench NAME: the benchmarks of rocm_moe.benchmarks (the scripts in bench/ run
the same code). rocm-moe bench NAME --help gives each one's method and flags.

    decode    one GPU, W = 1: the layer, its experts alone and its router alone, graph-replayed,
              against the experts' weight-read floor, at one or more buffer capacities
    comm      dispatch/combine of the comm backends (torch, and symm where it runs) against
              raw all_to_all_single of the same bytes and the peer-to-peer copy ceiling
    experts   the Triton experts against their floor, the torch reference beside them (a GPU)
    experts-fp8  the Triton FP8 block-scale experts against their FP8 floor (a GPU)
    layer     the whole EPMoE forward per rank and stage, tokens/s per GPU, traffic by
              locality; spawned or under torchrun across nodes (CPUs too)
    model     N MoE layers with residuals on one shared dispatcher, in one CUDA graph per
              bucket, against one layer alone: per-layer time, replay == eager, comm memory
    scaling   a model of the DeepSeek-V3 layer at EP 8-64 on H100 and MI300X nodes, fed by
              the measured results (no GPU)
"""

from __future__ import annotations

import argparse
import functools
import importlib

BENCHMARKS = {
    "decode": ("rocm_moe.benchmarks.decode",
               "W = 1 layer / experts / router, graph-replayed, against the weight-read floor"),
    "comm": ("rocm_moe.benchmarks.comm",
             "dispatch/combine GB/s against raw all_to_all_single"),
    "experts": ("rocm_moe.benchmarks.experts", "Triton experts against their floor (a GPU)"),
    "experts-fp8": ("rocm_moe.benchmarks.experts_fp8",
                    "Triton FP8 block-scale experts against their floor (a GPU)"),
    "layer": ("rocm_moe.benchmarks.layer",
              "the whole EPMoE forward per stage, any comm x experts, one or more nodes"),
    "model": ("rocm_moe.benchmarks.model",
              "N MoE layers on one dispatcher in one CUDA graph vs one layer alone"),
    "scaling": ("rocm_moe.benchmarks.scaling",
                "a model of the DeepSeek-V3 layer at EP 8-64, fed by the measured results"),
}
_CLI_KEYS = {"func", "command", "benchmark"}  # what the CLI adds to a benchmark's arguments


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help=f"benchmarks: {', '.join(BENCHMARKS)} (rocm-moe bench NAME "
                       "--help)", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    names = p.add_subparsers(dest="benchmark", required=True, metavar="NAME")
    for name, (module_name, help_text) in BENCHMARKS.items():
        module = importlib.import_module(module_name)
        b = names.add_parser(name, help=help_text, description=module.__doc__,
                             formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(b)
        b.set_defaults(func=functools.partial(_run, module=module, parser=b))


def _run(args: argparse.Namespace, *, module, parser: argparse.ArgumentParser) -> int:
    own = argparse.Namespace(**{k: v for k, v in vars(args).items() if k not in _CLI_KEYS})
    return module.run(own, parser)
