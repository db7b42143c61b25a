"""Every Triton kernel of the package compiles ahead of time for MI300 (gfx942) and H100 (sm_90)
with the launch configurations it would really get there, on a CPU with the PyPI triton wheel.

Asserts: it compiles; shared memory (LDS) fits the target (64 KiB per workgroup on gfx942,
where Triton would only fail at launch); no register spills to scratch/local memory (on a Triton
before 3.8, whose codegen spills the FP8 experts on gfx942, those are reported and skipped).
Prints one row per compile (registers, spills, MFMA count, waves per SIMD) with ``pytest -s`` and
writes them to ``$ROCM_MOE_COMPILE_REPORT`` when set. Each distinct configuration compiles
once (Triton's cache makes reruns fast); the list of kernels is ``rocm_moe._compile.KERNELS``.
"""

from __future__ import annotations

import os

import pytest

triton = pytest.importorskip("triton")

from rocm_moe import _compile  # noqa: E402
from rocm_moe.experts.triton import triton_version  # noqa: E402
from tests.conftest import compile_in_workers  # noqa: E402


def _has_backend(name: str) -> bool:
    try:
        from triton.backends import backends
    except ImportError:
        return False
    return name in backends


def _compile_row(job):
    target, index = job
    kernel, launch, origins = _compile.distinct_launches(target)[index]
    try:
        return _compile.compile_one(kernel, target, launch), origins, None
    except Exception as exc:  # reported with its config below
        return None, origins, f"{kernel.name} {launch}: {type(exc).__name__}: {exc}"


@pytest.fixture(scope="module", params=["gfx942", "sm_90"])
def compiled(request):
    target = request.param
    backend = _compile.TARGETS[target][0]
    if not _has_backend({"hip": "amd", "cuda": "nvidia"}[backend]):
        pytest.skip(f"this triton has no {backend} backend")
    jobs = [(target, i) for i in range(len(_compile.distinct_launches(target)))]
    rows = compile_in_workers(_compile_row, jobs, max(1, min(8, (os.cpu_count() or 2))))
    report = os.environ.get("ROCM_MOE_COMPILE_REPORT")
    lines = [r.row() + f" ({len(o)} uses)" if r else f"FAILED {err}" for r, o, err in rows]
    print("\n" + "\n".join(lines))
    if report:
        with open(report, "a") as f:
            f.write("\n".join(lines) + "\n")
    return target, rows


def test_every_kernel_is_listed():
    """A new Triton kernel module gets its line in _compile.KERNELS (issue 23)."""
    import ast
    import pathlib

    root = pathlib.Path(_compile.__file__).parent
    listed = {k.path for k in _compile.KERNELS}
    for path in root.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef) and any(
                    "jit" in ast.unparse(d) for d in node.decorator_list):
                module = ".".join(path.relative_to(root.parent).with_suffix("").parts)
                helper = node.name.startswith("_") and not node.name.endswith("_kernel")
                assert helper or f"{module}:{node.name}" in listed, f"{module}:{node.name}"


def test_compiles_and_fits(compiled):
    target, rows = compiled
    failed = [err for r, _, err in rows if r is None]
    assert not failed, "\n".join(failed)
    limit = _compile.TARGETS[target][4]
    too_big = [r.row() for r, _, _ in rows if r.shared > limit]
    assert not too_big, f"shared memory over {limit} bytes:\n" + "\n".join(too_big)
    names = {r.kernel for r, _, _ in rows}  # (the Gluon kernels: sm_90 launches only)
    assert names == {k.name for k in _compile.KERNELS if k.launches(target)}
    assert {k.name for k in _compile.KERNELS if not k.launches(target)} <= (
        set() if target == "sm_90" else {"_gluon_fp8_gate_up_kernel", "_gluon_fp8_down_kernel",
                                         "_ws_fp8_gate_up_kernel", "_ws_fp8_down_kernel"})


# Triton releases whose LLVM spills registers of the FP8 experts on gfx942 (measured on a CPU:
# 3.6.0 spills 30-152 VGPRs, 124-612 scratch bytes per lane, at BLOCK_M 64 and 128, and 67 VGPRs,
# 272 scratch bytes in the small path's per-row gate/up form (``_stream_gate_up_kernel``, S=8,
# [8, 16, 512] tiles); 3.8.0 and 3.9.0 spill none; 3.7 not tried). Those kernels still compile
# and run, slower.
FP8_SPILLS_ON_GFX942_BEFORE = (3, 8)
FP8_EXPERT_KERNELS = ("_fp8_", "_stream_")  # experts/_triton_fp8.py, _triton_small_fp8.py


def test_no_register_spills(compiled):
    """No kernel spills registers to scratch/local memory; on gfx942 with a Triton older than
    FP8_SPILLS_ON_GFX942_BEFORE the FP8 experts do (its codegen, not this package's configs):
    every other kernel is still checked, then the test skips naming them."""
    target, rows = compiled
    spilled = [r for r, _, _ in rows if r is not None and (r.vgpr_spills or r.scratch)]
    known = [r for r in spilled if target == "gfx942" and r.kernel.startswith(FP8_EXPERT_KERNELS)
             and triton_version() < FP8_SPILLS_ON_GFX942_BEFORE]
    others = [r.row() for r in spilled if r not in known]
    assert not others, "register spills:\n" + "\n".join(others)
    if known:
        worst = max(known, key=lambda r: r.scratch or 0)
        pytest.skip(f"needs triton >= {'.'.join(map(str, FP8_SPILLS_ON_GFX942_BEFORE))}: "
                    f"triton {triton.__version__} spills registers in {len(known)} FP8 expert "
                    f"configs on gfx942 (worst: {worst.kernel} {worst.vgpr_spills} VGPRs, "
                    f"{worst.scratch} scratch bytes per lane); every other kernel: no spills")


def test_gfx942_matrix_cores_and_occupancy(compiled):
    """The GEMMs use MFMA on gfx942, and every expert config keeps at least 2 waves per SIMD
    (the bf16 experts, and the MXFP4 ones whose tiles are dequantised in registers)."""
    target, rows = compiled
    if target != "gfx942":
        pytest.skip("gfx942 only")
    for r, _, _ in rows:
        if r.kernel in ("_gate_up_kernel", "_down_kernel", "_mxfp4_gate_up_kernel",
                        "_mxfp4_down_kernel"):
            assert r.mfma > 0, r.row()
            assert r.waves_per_simd >= 2, r.row()


def test_vgprs_allocated_counts_agprs_once():
    """``.vgpr_count`` already holds the AGPRs (Triton 3.6's LLVM puts MFMA accumulators
    there): the registers a lane holds are TotalNumVgprs, not ``.vgpr_count + .agpr_count``."""
    asm = ("; NumVgprs: 180\n; NumAgprs: 64\n; TotalNumVgprs: 244\n"
           "  - .agpr_count:     64\n    .vgpr_count:     244\n")
    assert _compile.vgprs_allocated(asm) == 244
    assert _compile.vgprs_allocated("    .vgpr_count:     67\n") == 67
    assert _compile.occupancy(vgprs=244, lds=8192, num_warps=4) == 2  # 308 would give 1


def test_occupancy_worked_example():
    assert _compile.occupancy(vgprs=108, lds=24576, num_warps=4) == 2
    assert _compile.occupancy(vgprs=256, lds=0, num_warps=4) == 2
    assert _compile.occupancy(vgprs=40, lds=65536, num_warps=4) == 1


def test_amd_heuristic_defaults():
    """The fallback MI300 gets (no tuned table for it): 2 stages, no wider than the measured
    fits; NVIDIA keeps its defaults."""
    from rocm_moe.experts.triton import block_config

    for slots, block_m in ((1, 16), (32 * 8, 32), (256 * 8, 64)):
        amd = block_config(slots, 8, device_name="AMD Instinct MI300X")
        nv = block_config(slots, 8, device_name="NVIDIA GeForce RTX 4090")
        assert amd["BLOCK_M"] == nv["BLOCK_M"] == block_m
        assert amd["gate_up"]["num_stages"] == 2
        assert nv["gate_up"]["num_stages"] == 3


def test_gluon_fp8_probe_builds_for_sm_90():
    """bench/gluon_fp8_probe.py (issue 31's measurement of a promotion overlapped with the next
    async wgmma) builds for sm_90 with this Triton: in the SASS (ptxas may serialise what the
    PTX asks) the overlapped variant waits with one wgmma group in flight, the drained one
    never does; neither spills."""
    import subprocess
    import sys
    from pathlib import Path

    if not _has_backend("nvidia"):
        pytest.skip("this triton has no nvidia backend")
    pytest.importorskip("triton.experimental.gluon.language.nvidia.hopper")
    root = Path(__file__).resolve().parents[1]
    path = os.pathsep.join(p for p in (str(root), os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "TRITON_INTERPRET": "0", "PYTHONPATH": path}
    out = subprocess.run([sys.executable, str(root / "bench" / "gluon_fp8_probe.py"),
                          "--compile"], capture_output=True, text=True, env=env, timeout=600,
                         check=True, cwd=root).stdout
    rows = {line.split(":")[0]: line for line in out.splitlines() if ": " in line}
    assert "waits ['0x0', '0x1']" in rows["overlap"], out  # (in the SASS: not serialised)
    assert "waits ['0x0']" in rows["drain"], out
    assert all(" 0 B local" in rows[v] and "serialised False" in rows[v]
               for v in ("overlap", "drain")), out
