"""The Triton FP8 experts' launch variants (issue 31: tensor descriptors, scales loaded a K step
ahead, persistent tile loops, 256-wide down tiles), the
config checks and table, the tuner's candidate lists and correctness gate, and the benchmarks'
FP8 ceiling.

Every variant computes the same sums as today's launch, so each is held to the FP8 reference
(same quantisation) like ``test_fp8.py``'s Triton tests: rows with -1 slots, a local expert with
no tokens, both weight modes (non-local slots exact zeros). In Triton's interpreter on CPUs
(float32 outputs, FP8 tiles upcast to float16), compiled on GPUs (bfloat16, native FP8 dots; a
Qwen3-sized shape so the descriptors are 16-byte aligned, and H = 200 where they fall back).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from rocm_moe.experts.fp8 import FP8ReferenceExperts
from tests.conftest import DEVICE, rel_err
from tests.experts.test_fp8 import MODEL_TOL, ORACLE_TOL, _case, _oracles

triton = pytest.importorskip("triton")

from rocm_moe.experts import triton_fp8 as tf  # noqa: E402
from rocm_moe.experts.triton_fp8 import (  # noqa: E402
    TritonFP8Experts,
    check_config,
    fp8_block_config,
)


def _cfg(block_m, *, desc=False, ahead=False, down_n=128, persistent=False,
         programs_per_sm=None):
    def k(bn):
        return dict(BLOCK_N=bn, BLOCK_K=128, num_warps=4, num_stages=2, desc=desc, ahead=ahead)
    cfg = dict(BLOCK_M=block_m, gate_up=k(128), down=k(down_n))
    if persistent:
        cfg["persistent"] = True
    if programs_per_sm:
        cfg["programs_per_sm"] = programs_per_sm
    return cfg


VARIANTS = [
    pytest.param(_cfg(16, desc=True), id="M16_desc"),
    pytest.param(_cfg(16, desc=True, down_n=256, persistent=True, programs_per_sm=1),
                 id="M16_desc_dn256_persistent1"),
    pytest.param(_cfg(32, ahead=True, down_n=256, persistent=True),
                 id="M32_ptr_ahead_dn256_persistent"),
    pytest.param(_cfg(64, desc=True, ahead=True, down_n=64), id="M64_desc_ahead_dn64"),
    pytest.param(dict(_cfg(32, ahead=True), gate_up=dict(_cfg(32)["gate_up"], fused=True)),
                 id="M32_fused_ahead"),
    pytest.param(_cfg(128, desc=True, ahead=True, down_n=256), id="M128_desc_ahead_dn256"),
]
SHAPES = [(33, 2, 8, 2, 256, 256)] if DEVICE.type == "cpu" else [
    (1024, 8, 128, 8, 2048, 768), (33, 4, 16, 2, 200, 256)]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "R{}_K{}_E{}_W{}_H{}_I{}".format(*s))
@pytest.mark.parametrize("cfg", VARIANTS)
def test_variant_matches_reference(cfg, shape, gen):
    args, fw = _case(*shape, gen)
    out_dtype = torch.float32 if DEVICE.type == "cpu" else torch.bfloat16
    tol = ORACLE_TOL if out_dtype == torch.float32 else 1e-2
    local = args[5].local_ids(args[1]) >= 0
    for mode in ("experts", "combine"):
        out = TritonFP8Experts(config=cfg, path="grouped")(*args, weight_mode=mode,
                                                           out_dtype=out_dtype).out
        ref = FP8ReferenceExperts()(*args, weight_mode=mode).out
        assert rel_err(out, ref) < tol, mode
        if mode == "combine":
            assert out[~local].eq(0).all()
        elif fw is not None:  # the float64 oracles (small shapes: all experts drawn)
            y_q, y_model = _oracles(args, fw)
            assert rel_err(out.cpu(), y_q) < tol
            assert rel_err(out.cpu(), y_model) < MODEL_TOL


@pytest.mark.skipif(DEVICE.type == "cpu", reason="the interpreter has no reduced-precision "
                    "accumulator: precise=True computes the same there")
@pytest.mark.parametrize("cfg", VARIANTS)
def test_variant_precise_float32(cfg, gen):
    """precise=True (float32 promotion every MMA) with every variant: float32 rounding only."""
    args, _ = _case(*SHAPES[0], gen)
    out = TritonFP8Experts(config=cfg, precise=True, path="grouped")(
        *args, weight_mode="experts", out_dtype=torch.float32).out
    ref = FP8ReferenceExperts()(*args, weight_mode="experts").out
    assert rel_err(out, ref) < 1e-3


def test_heuristic_config_is_valid():
    for slots in (8, 40 * 8, 1000 * 8):
        check_config(fp8_block_config(slots, 8))


@pytest.mark.parametrize(("change", "match"), [
    (dict(BLOCK_Q=1), r"config\['BLOCK_Q'\]=1: unknown key"),
    (dict(gate_up=dict(BLOCK_N=64, BLOCK_K=128, num_warps=4, num_stages=2)),
     r"config\['gate_up'\]\['BLOCK_N'\]=64: must be 128"),
    (dict(down=dict(BLOCK_N=96, BLOCK_K=128, num_warps=4, num_stages=2)),
     r"config\['down'\]\['BLOCK_N'\]=96: must be 16, 32, 64, 128"),
    (dict(down=dict(BLOCK_N=128, BLOCK_K=64, num_warps=4, num_stages=2)),
     r"config\['down'\]\['BLOCK_K'\]=64: must be 128, the scale group"),
    (dict(down=dict(BLOCK_N=128, BLOCK_K=128, num_warps=4, num_stages=2, tma=True)),
     r"config\['down'\]\['tma'\]=True: unknown key"),
    (dict(down=dict(_cfg(16)["down"], ws=True)),  # warp_specialize: sm_90 cannot compile it
     r"config\['down'\]\['ws'\]=True: unknown key"),
    (dict(persistent=True, flatten=True),  # the same PTX as without it: removed
     r"config\['flatten'\]=True: unknown key"),
    (dict(programs_per_sm=1), r"config\['programs_per_sm'\]=1: sets the persistent launch"),
    (dict(persistent=True, programs_per_sm=0),
     r"config\['programs_per_sm'\]=0: must be a positive int"),
    (dict(down=None), r"config\['down'\]=None: must be a dict"),
    (dict(BLOCK_M=48), r"config\['BLOCK_M'\]=48: must be 16, 32, 64, 128 or 256"),
    (dict(gate_up=dict(_cfg(16, desc=True)["gate_up"], fused=True)),
     r"config\['gate_up'\]\['fused'\]=True: loads its one gate\+up tile through pointers"),
    (dict(down=dict(_cfg(16)["down"], fused=True)),
     r"config\['down'\]\['fused'\]=True: fuses the gate and up tiles \(gate_up only\)"),
    (dict(gate_up=dict(BLOCK_N=128, BLOCK_K=128, num_stages=2)),
     r"config\['gate_up'\]\['num_warps'\]=None: must be a positive int"),
])
def test_bad_config_is_refused_with_the_fix(change, match):
    with pytest.raises(ValueError, match=match + r".*Fix: "):
        TritonFP8Experts(config={**_cfg(16), **change})


def test_table_entry_is_read(tmp_path, monkeypatch):
    """A table file (ROCM_MOE_FP8_CONFIGS) gives its entry for (device, H x I, bucket), the
    largest bucket's above it, and the heuristic where it has none."""
    tuned = _cfg(64, desc=True, down_n=256, persistent=True)
    table = {"GPU X": {"2048x768": {"256": tuned, "16": _cfg(16)}}}
    path = tmp_path / "t.json"
    path.write_text(json.dumps(table))
    monkeypatch.setenv(tf.CONFIG_ENV, str(path))
    kw = dict(num_experts=128, device_name="GPU X", hidden=2048, inter=768)
    assert fp8_block_config(4096 * 8, 128, **kw) == tuned  # 256 slots per expert
    assert fp8_block_config(16384 * 8, 128, **kw) == tuned  # 1024: above the largest
    assert fp8_block_config(2 * 8, 128, **kw)["BLOCK_M"] == 16  # 0.125: the heuristic
    assert fp8_block_config(4096 * 8, 128, **dict(kw, hidden=7168)) == \
        fp8_block_config(4096 * 8, 128, num_experts=128)  # another shape: the heuristic
    fp8_block_config(4096 * 8, 128, **kw)["down"]["BLOCK_N"] = 0  # a copy: the table keeps
    assert fp8_block_config(4096 * 8, 128, **kw)["down"]["BLOCK_N"] == 256


def test_bad_table_entry_is_refused_naming_the_file(tmp_path, monkeypatch):
    path = tmp_path / "bad.json"
    bad = dict(_cfg(64), down=dict(BLOCK_N=128, BLOCK_K=64, num_warps=4, num_stages=2))
    path.write_text(json.dumps({"GPU X": {"2048x768": {"256": bad}}}))
    monkeypatch.setenv(tf.CONFIG_ENV, str(path))
    with pytest.raises(ValueError, match=r"bad.json, entry \['GPU X'\]\[2048x768\]\[256\]: "
                       r"config\['down'\]\['BLOCK_K'\]=64"):
        fp8_block_config(4096 * 8, 128, num_experts=128, device_name="GPU X", hidden=2048,
                         inter=768)


# ---- the tuner (bench/tune_experts_fp8.py) -----------------------------------------------------
@pytest.fixture
def tuner():
    sys.path.insert(0, str(Path(__file__).parents[2] / "bench"))
    try:
        import tune_experts_fp8
    finally:
        sys.path.pop(0)
    return tune_experts_fp8


def test_tuner_candidates_are_valid_configs(tuner):
    cands = [dict(BLOCK_M=m, gate_up=gu, down=tuner.HEURISTIC_DOWN[m], **top)
             for m, gu, top in tuner.GATE_UP]
    cands += [dict(cands[0], down=dn) for dn in tuner.DOWN]
    for c in cands:
        check_config(c)
    assert len(cands) <= 30  # the GPU sweep's time (bench/gpu_fp8_gemm.sh)
    assert len({tuner._label(c) for c in cands}) == len(cands)  # each one once


def test_tuner_flags_a_wrong_candidate_and_times_none(tuner, monkeypatch):
    import triton.testing

    class Case:  # a stand-in: the reference, and a "kernel" that is off by 5%
        name, R, flops, floor = "tiny", 3, 1e9, 1e-6
        ref = torch.ones(3, 4)

        def run(self, cfg, **kw):
            return self.ref * (1.05 if cfg["BLOCK_M"] == 64 else 1.0)

    timed = []
    monkeypatch.setattr(triton.testing, "do_bench_cudagraph",
                        lambda fn, **k: timed.append(fn) or 2e-3)
    good = tuner.measure(Case(), _cfg(16), 20)
    bad = tuner.measure(Case(), _cfg(64), 20)
    assert good["status"] == "ok"
    assert good["us"] == pytest.approx(2.0)
    assert good["over_floor"] == pytest.approx(2.0)
    assert bad["status"] == "WRONG"
    assert bad["rel_err"] == pytest.approx(0.05)
    assert len(timed) == 1
    broken = tuner.measure(Case(), dict(_cfg(16), programs_per_sm=1), 20)  # refused config
    assert broken["status"].startswith("ValueError")


# ---- the benchmarks' FP8 ceiling ----------------------------------------------------------------
def test_fp8_ceiling_without_a_gpu_is_none():
    from rocm_moe.benchmarks.experts import fp8_matmul_rates

    if torch.cuda.is_available():
        pytest.skip("a GPU is here: it measures")
    assert fp8_matmul_rates() is None


def test_ceiling_line():
    from rocm_moe.benchmarks.experts import ceiling_line

    assert ceiling_line(dict(copy_GBps=3000.4, matmul_TFLOPs=701.2, fp8_matmul_TFLOPs=1402.6)) \
        == "copy 3000 GB/s, bf16 matmul 701 TFLOP/s, FP8 _scaled_mm 1403 TFLOP/s (measured)"
    assert ceiling_line(dict(copy_GBps=900.0, matmul_TFLOPs=300.0, fp8_matmul_TFLOPs=None)) \
        == "copy 900 GB/s, bf16 matmul 300 TFLOP/s, FP8 _scaled_mm none (measured)"
    assert ceiling_line(dict(copy_GBps=1.0, fp8_matmul_TFLOPs=2.0)) \
        == "copy 1 GB/s, FP8 _scaled_mm 2 TFLOP/s (measured)"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_fp8_ceiling_on_the_gpu():
    from rocm_moe.benchmarks.experts import fp8_matmul_rates

    rates = fp8_matmul_rates(n=2048)
    if rates is None:
        pytest.skip("this GPU's matrix units take no FP8")
    assert rates["fp8_matmul_TFLOPs"] == max(v for k, v in rates.items()
                                             if k.startswith("fp8_matmul_TFLOPs_"))
    assert rates["fp8_matmul_TFLOPs"] > 10


def test_bench_without_bf16_leaves_its_columns_empty(monkeypatch):
    """``bench experts-fp8 --no-bf16`` (bench/gpu_fp8_gemm.sh): the FP8 row only."""
    import triton.testing

    from rocm_moe.benchmarks import experts as be
    from rocm_moe.benchmarks import experts_fp8 as b

    if DEVICE.type == "cuda":
        pytest.skip("the GPU runs the real benchmark")
    calls = []
    monkeypatch.setattr(torch.Tensor, "cuda", lambda self, *a, **k: self)
    monkeypatch.setattr(triton.testing, "do_bench_cudagraph",
                        lambda fn, **k: (calls.append(fn), 1.0)[1])
    monkeypatch.setattr(b, "_routing", lambda s, R, g: be._routing(s, R, g, device="cpu"))
    shape = dict(E=8, W=2, rank=1, H=128, I=128, K=2)
    (row,) = b.run_shape("tiny", shape, dict(copy_GBps=1e3, fp8_matmul_TFLOPs=1e2), [3],
                         bf16=False)
    assert len(calls) == 1  # the FP8 stage only
    assert row["bf16_time_us"] is row["rel_err_vs_bf16"] is row["fp8_speedup_over_bf16"] is None
    assert row["rel_err_vs_fp8_reference"] < 1e-2


def test_amd_heuristic_keeps_one_lds_buffer():
    """MI300's FP8 configs (``AMD_FP8_CONFIGS``): 2 stages (one LDS buffer of the pipelined
    loads: 34-48 KiB of gfx942's 64 KiB, compiled in tests/test_compile_targets.py with the
    launches' alignment); NVIDIA keeps its deeper pipelines."""
    for slots in (8, 40 * 8, 1000 * 8):
        amd = fp8_block_config(slots, 8, device_name="AMD Instinct MI300X")
        nv = fp8_block_config(slots, 8, device_name="NVIDIA H100 80GB HBM3")
        check_config(amd)
        assert amd["BLOCK_M"] == nv["BLOCK_M"]
        assert amd["gate_up"]["num_stages"] == amd["down"]["num_stages"] == 2
        assert nv["gate_up"]["num_stages"] >= 3


def test_compile_specialises_aligned_launch_arguments():
    """``_compile.aligned_attrs``: every pointer and the named ints divisible by 16, as
    Triton's launcher specialises a real launch (which sizes the pipelined shared memory)."""
    from rocm_moe import _compile
    from rocm_moe.experts._triton_fp8 import _fp8_down_kernel

    kernel = next(k for k in _compile.KERNELS if k.name == "_fp8_down_kernel")
    cx = dict(BLOCK_M=128, BLOCK_N=128, DESC=True)
    sig = _compile.signature(_fp8_down_kernel, kernel, cx, "sm_90")
    assert sig["iq_ptr"] == "tensordesc<fp8e4nv[128, 128]>"  # DESC: descriptors, not pointers
    attrs = _compile.aligned_attrs(_fp8_down_kernel, sig, kernel.aligned)
    names = {_fp8_down_kernel.arg_names[i] for (i,) in attrs}
    assert {"is_ptr", "out_ptr", "weight_ptr", "H", "I", "stride_os"} <= names
    assert not names & {"iq_ptr", "w_ptr", "N_SLOTS", "N_KB", "stride_is"}


def test_tuner_picks_the_fastest_correct_candidate(tuner, monkeypatch):
    """``tune``: every gate/up candidate on every case, then the down ones on each case's best;
    a wrong candidate is never the best however fast; a spent budget skips the rest."""
    import triton.testing

    fast_but_wrong, fast = _cfg(64, desc=True), _cfg(32)
    times = {64: 1e-3, 32: 2e-3, 16: 3e-3}  # ms by BLOCK_M; down BLOCK_N 256: 10% faster

    class Case:
        name, flops, floor, heuristic = "tiny", 1e9, 1e-6, _cfg(16)
        ref = torch.ones(2, 2)

        def __init__(self, R):
            self.R = R

        def run(self, cfg, **kw):
            self.last = cfg
            return self.ref * (2.0 if cfg == fast_but_wrong else 1.0)

    def bench(fn, **kw):  # the time of the config the timed call ran
        fn()
        cfg = cases[0].last
        return times[cfg["BLOCK_M"]] * (0.9 if cfg["down"]["BLOCK_N"] == 256 else 1.0)

    cases = [Case(1)]
    monkeypatch.setattr(triton.testing, "do_bench_cudagraph", bench)
    monkeypatch.setattr(tuner, "GATE_UP", [(64, fast_but_wrong["gate_up"], {}),
                                           (32, fast["gate_up"], {})])
    monkeypatch.setattr(tuner, "HEURISTIC_DOWN", {64: fast_but_wrong["down"], 32: fast["down"]})
    monkeypatch.setattr(tuner, "DOWN", [dict(fast["down"], BLOCK_N=256)])
    (rows,) = tuner.tune(cases, dict(fp8_matmul_TFLOPs=1.0), 20, deadline=float("inf"))
    assert [r["status"] for r in rows] == ["ok", "WRONG", "ok", "ok"]
    best = min((r for r in rows if r["status"] == "ok"), key=lambda r: r["us"])
    assert best["config"] == dict(fast, down=dict(fast["down"], BLOCK_N=256))
    (rows,) = tuner.tune(cases, dict(fp8_matmul_TFLOPs=1.0), 20, deadline=0.0)
    assert len(rows) == 1  # the heuristic only


def test_compile_list_takes_the_table_variants(monkeypatch):
    """A tuned sm_90 entry's variants reach the compile list (``_compile._fp8_experts``):
    descriptors, scales ahead, fused gate/up, persistent at BLOCK_M 128."""
    from rocm_moe import _compile

    entry = dict(_cfg(128, desc=True, ahead=True, down_n=256, persistent=True),
                 programs_per_sm=1)
    entry["gate_up"] = dict(entry["gate_up"], desc=False, fused=True)
    device = _compile.TARGETS["sm_90"][3]
    monkeypatch.setattr(tf, "fp8_config_table", lambda: {device: {"2048x768": {"256": entry}}})
    gu = [dict(x.constexprs) for x in _compile._fp8_experts("gate_up")("sm_90")
          if x.origin.startswith("table")]
    dn = [dict(x.constexprs) for x in _compile._fp8_experts("down")("sm_90")
          if x.origin.startswith("table")]
    assert [(c["FUSED"], c["DESC"], c["AHEAD"], c["PERSISTENT"]) for c in gu] \
        == [(True, False, True, True)]
    assert {(c["BLOCK_N"], c["DESC"], c["AHEAD"], c["PERSISTENT"]) for c in dn} \
        == {(256, True, True, True)}
    assert {c["WEIGHTED"] for c in dn} == {True, False}


def _compile_sm_90(job):
    from rocm_moe import _compile

    cfg, name = job
    kernel = next(k for k in _compile.KERNELS if k.name == f"_fp8_{name}_kernel")
    launches = {(la.constexprs, la.num_warps, la.num_stages): la
                for la in _compile.fp8_launches(cfg, "sm_90", name)}
    try:
        for launch in launches.values():  # both weight modes, persistent or not
            _compile.compile_one(kernel, "sm_90", launch)
    except Exception as exc:  # reported with its variant below
        return f"{type(exc).__name__}: {str(exc)[:200]}"
    return None


def test_every_variant_compiles_for_sm_90():
    """Each variant's two kernels compile ahead of time for the H100 (sm_90) with FP8 dots, on
    any machine with the PyPI wheel: the interpreter ignores compile-only options (a
    ``warp_specialize`` K loop passed every CPU test here and failed to compile on the GPU).
    Spawned workers compile for real (this session's kernels are the interpreter's)."""
    import os

    from triton.backends import backends

    from tests.conftest import compile_in_workers

    if "nvidia" not in backends:
        pytest.skip("this triton has no NVIDIA backend")
    pairs = [(v, name) for v in VARIANTS for name in ("gate_up", "down")]
    errors = compile_in_workers(_compile_sm_90, [(v.values[0], n) for v, n in pairs],
                                min(4, os.cpu_count() or 2))
    failed = [f"{v.id} {name}: {err}" for (v, name), err in zip(pairs, errors, strict=True)
              if err]
    assert not failed, "\n".join(failed)


# ---- Gluon kernels (experts/_gluon_fp8.py: NVIDIA sm_90) -------------------------------------

def _gluon_cfg(block_m=64, gu_stages=4, dn_stages=4):
    return tf._gluon_config(block_m, gu_stages, dn_stages)


@pytest.mark.parametrize("cfg", list(tf.GLUON_CONFIGS.values()))
def test_gluon_configs_are_valid(cfg):
    check_config(cfg)
    assert cfg["gluon"] in (True, "ws")


@pytest.mark.parametrize(("change", "match"), [
    (dict(BLOCK_M=64), r"config\['BLOCK_M'\]=64: must be 128 with 'gluon': 'ws'"),
    (dict(gate_up=dict(num_warps=8)), r"config\['gate_up'\]\['num_warps'\]=8: must be 4 with "
     r"'gluon': 'ws'"),
    (dict(gate_up=dict(num_stages=5)), r"config\['gate_up'\]\['num_stages'\]=5: must be 2\.\.4 "
     r"with 'gluon' at BLOCK_M 128 \(the TMA ring"),
    (dict(down=dict(num_stages=8)), r"config\['down'\]\['num_stages'\]=8: must be 2\.\.7"),
    (dict(down=dict(num_stages=1)), r"config\['down'\]\['num_stages'\]=1: must be 2\.\.7"),
    (dict(down=dict(desc=True)), r"config\['down'\]\['desc'\]=True: is a Triton kernel"),
])
def test_bad_ws_config_is_refused_with_the_fix(change, match):
    """The warp-specialised kernels' config ("gluon": "ws"): BLOCK_M 128, 4 warps (a consumer
    warpgroup), a TMA ring that fits 227 KiB; each refusal names the key and the fix."""
    cfg = tf.GLUON_CONFIGS["ws"]
    bad = {**cfg, **{k: dict(cfg[k], **v) if isinstance(v, dict) else v
                     for k, v in change.items()}}
    with pytest.raises(ValueError, match=match + r".*Fix: "):
        TritonFP8Experts(config=bad)
    for stages in ((2, 2), (4, 7)):  # the ring's ends are accepted, persistent or not
        TritonFP8Experts(config=tf._gluon_config(128, *stages, ws=True))
        TritonFP8Experts(config=tf._gluon_config(128, *stages, ws=True, persistent=True))


@pytest.mark.parametrize(("change", "match"), [
    (dict(gluon=1), r"config\['gluon'\]=1: must be True, 'ws' or absent"),
    (dict(BLOCK_M=32), r"config\['BLOCK_M'\]=32: must be 64 or 128 with 'gluon'"),
    (dict(persistent=True), r"config\['persistent'\]=True: is a Triton launch"),
    (dict(gate_up=dict(_gluon_cfg()["gate_up"], desc=True)),
     r"config\['gate_up'\]\['desc'\]=True: is a Triton kernel variant"),
    (dict(down=dict(_gluon_cfg()["down"], BLOCK_N=64)),
     r"config\['down'\]\['BLOCK_N'\]=64: must be 128 with 'gluon'"),
    (dict(down=dict(_gluon_cfg()["down"], num_warps=8)),
     r"config\['down'\]\['num_warps'\]=8: must be BLOCK_M / 16 = 4"),
    (dict(down=dict(_gluon_cfg()["down"], num_stages=2)),
     r"config\['down'\]\['num_stages'\]=2: must be 3\.\.9 with 'gluon' at BLOCK_M 64"),
    (dict(gate_up=dict(_gluon_cfg()["gate_up"], num_stages=6)),
     r"config\['gate_up'\]\['num_stages'\]=6: must be 2\.\.5 with 'gluon' at BLOCK_M 64"),
])
def test_bad_gluon_config_is_refused_with_the_fix(change, match):
    with pytest.raises(ValueError, match=match + r".*Fix: "):
        TritonFP8Experts(config={**_gluon_cfg(), **change})


def test_gluon_refused_off_sm_90_naming_the_fix(gen):
    """A gluon config where its kernels cannot run: a ValueError naming why and the fix (here
    on a CPU, or a GPU other than sm_90), never the Triton kernels in its place."""
    if DEVICE.type == "cuda" and torch.cuda.get_device_capability(DEVICE) == (9, 0):
        pytest.skip("sm_90 runs the Gluon kernels (test_gpu_gluon_matches_reference)")
    args, _ = _case(33, 2, 8, 2, 256, 256, gen)
    with pytest.raises(ValueError, match=r"config\['gluon'\]=True: the Gluon FP8 kernels run "
                       r".*Fix: drop 'gluon'"):
        TritonFP8Experts(config=_gluon_cfg(), path="grouped")(*args, weight_mode="experts")
    kw = dict(upcast=False, precise=False, hidden=256, inter=256)
    cpu, fp8 = torch.device("cpu"), torch.float8_e4m3fn
    assert tf.gluon_refusal(cpu, fp8, **kw) == "run on NVIDIA sm_90 (Hopper) only"
    # shape rules first, on any device (H = 200: rows not 16-byte copies; I not whole blocks)
    assert "H (here 200) a multiple of 16" in tf.gluon_refusal(cpu, fp8, **{**kw, "hidden": 200})
    assert "I (here 320) a multiple of 128" in tf.gluon_refusal(cpu, fp8, **{**kw, "inter": 320})


sm90 = pytest.mark.skipif(DEVICE.type != "cuda" or torch.version.hip is not None
                          or torch.cuda.get_device_capability(DEVICE) != (9, 0),
                          reason="the Gluon FP8 kernels need an NVIDIA sm_90 GPU")


@sm90
@pytest.mark.parametrize("shape", [(1024, 8, 128, 8, 2048, 768), (33, 4, 16, 2, 208, 384),
                                   (5, 2, 4, 1, 128, 128), (3000, 8, 64, 8, 7168, 2048)],
                         ids=lambda s: "R{}_K{}_E{}_W{}_H{}_I{}".format(*s))
@pytest.mark.parametrize("name", list(tf.GLUON_CONFIGS))
def test_gpu_gluon_matches_reference(name, shape, gen):
    """The Gluon kernels against the FP8 reference in both weight modes (-1 slots, other
    ranks' experts; H = 208: a partial last K step and output tile, I = 384: an odd count of
    down K steps, the pair loop's tail; H = I = 128: one K step in each GEMM; DeepSeek-V3's
    shape: 56 gate/up K steps, 16 down),
    and beside the Triton kernels of the
    same BLOCK_M (the same sums: their difference is reported, not asserted equal). "ws": the
    warp-specialised kernels (block-ordered rows by TMA, the two consumers' halves)."""
    cfg = tf.GLUON_CONFIGS[name]
    args, _ = _case(*shape, gen)
    local = args[5].local_ids(args[1]) >= 0
    triton_cfg = fp8_block_config(8192 * 8, 8)
    triton_cfg["BLOCK_M"] = cfg["BLOCK_M"]
    for mode in ("experts", "combine"):
        out = TritonFP8Experts(config=cfg, path="grouped")(*args, weight_mode=mode).out
        ref = FP8ReferenceExperts()(*args, weight_mode=mode).out
        assert rel_err(out, ref) < 1e-2, mode
        other = TritonFP8Experts(config=triton_cfg, path="grouped")(*args, weight_mode=mode).out
        assert rel_err(out, other) < 1e-2, mode
        if mode == "combine":
            assert out[~local].eq(0).all()


@sm90
@pytest.mark.parametrize("name", ["128", "ws", "ws_persistent"])
def test_gpu_gluon_graph_replay_and_empty_blocks(name, gen):
    """Under CUDA-graph capture (no host reads) with a capacity-sized batch (rows past
    num_rows are -1: blocks of the layout unused), the replay gives the eager call's bits."""
    args, _ = _case(1024, 8, 128, 8, 2048, 768, gen)
    ids = args[1].clone()
    ids[600:] = -1
    args = (args[0], ids, *args[2:])
    ex = TritonFP8Experts(config=tf.GLUON_CONFIGS[name], path="grouped")
    eager = ex(*args, weight_mode="experts", validate=False).out.clone()
    ref = FP8ReferenceExperts()(*args, weight_mode="experts").out
    assert rel_err(eager, ref) < 1e-2
    g = torch.cuda.CUDAGraph()
    torch.cuda.synchronize()
    with torch.cuda.graph(g):
        captured = ex(*args, weight_mode="experts", validate=False).out
    g.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured, eager)
