"""Issue 34, the command line and launch half: every flag of every command checked while the
command line is parsed (rocm_moe.cli.argtypes), before any rank starts; the checkpoint's config
given to diagnose and sanity; a stale torchrun environment refused at once or timed out
naming its variables; the library's refusal printed as one line."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import pytest

from rocm_moe.cli import main

SMALL = ["--num-experts", "8", "--hidden", "32", "--intermediate", "16", "--top-k", "2"]
LONG = "n" * 300  # longer than any file system's name limit (255 bytes)


@pytest.fixture
def no_ranks(monkeypatch):
    """Fail the test if any command starts a rank or runs a benchmark."""
    from rocm_moe.benchmarks import comm, layer, model
    from rocm_moe.cli import ranks

    def started(*a, **k):
        raise AssertionError("a rank was started")

    for module in (ranks, comm, layer, model):
        monkeypatch.setattr(module, "launch", started)


A_FILE = __file__  # an existing file: a folder "under" it cannot be made

CASES = {
    # the list
    "layer_experts_unknown": (["bench", "layer", "--experts", "nope"],
                              "argument --experts: invalid choice: 'nope'"),
    "layer_out_under_a_file": (["bench", "layer", "--out", f"{A_FILE}/results"],
                               "argument --out: value="),
    "comm_iters_0": (["bench", "comm", "--iters", "0"], "argument --iters: value='0': must be an "
                     "integer >= 1"),
    "scaling_ep_0": (["bench", "scaling", "--ep", "8", "0"], "argument --ep: value='0'"),
    "scaling_nic_0": (["bench", "scaling", "--nic-GBps", "0"],
                      "argument --nic-GBps: value='0': must be > 0"),
    "run_json_too_long": (["run", *SMALL, "--json", f"/tmp/{LONG}.json"],
                          "argument --json: value="),
    "layer_zipf_tau_nan": (["bench", "layer", "--zipf-tau", "nan"],
                           "argument --zipf-tau: value='nan': must be finite"),
    "layer_skew_scale_0": (["bench", "layer", "--skew-scale", "0"],
                           "argument --skew-scale: value='0': must be > 0"),
    "layer_skew_scale_inf": (["bench", "layer", "--skew-scale", "inf"],
                             "argument --skew-scale: value='inf': must be finite"),
    "diagnose_shared_0": (["diagnose", *SMALL, "--shared-intermediate", "0"],
                          "Fix: omit the flag for no shared experts"),
    "sanity_shared_0": (["sanity", *SMALL, "--shared-intermediate", "0"],
                        "Fix: omit the flag for no shared experts"),
    "run_shared_0": (["run", *SMALL, "--shared-intermediate", "0"],
                     "Fix: omit the flag for no shared experts"),
    # their siblings
    "run_tokens_negative": (["run", *SMALL, "--tokens", "-5"], "argument --tokens: value='-5'"),
    "run_world_size_0": (["run", *SMALL, "--world-size", "0"], "argument --world-size:"),
    "run_hidden_0": (["run", *SMALL, "--hidden", "0"], "argument --hidden: value='0'"),
    "run_iters_float": (["run", *SMALL, "--iters", "2.5"], "must be an integer"),
    "run_json_folder": (["run", *SMALL, "--json", "/tmp"], "is a folder, not a file"),
    "run_json_no_folder": (["run", *SMALL, "--json", "/nonexistent-dir/o.json"],
                           "its folder /nonexistent-dir does not exist"),
    "run_layer_negative": (["run", *SMALL, "--layer", "-1"], "argument --layer: value='-1'"),
    "run_checkpoint_missing": (["run", "--checkpoint", "/nonexistent-ckpt"],
                               "argument --checkpoint: value='/nonexistent-ckpt': is not an "
                               "existing folder"),
    "run_seed_negative": (["run", *SMALL, "--seed", "-1"], "argument --seed: value='-1'"),
    "diagnose_batch_0": (["diagnose", *SMALL, "--batch", "0"], "argument --batch: value='0'"),
    "comm_tokens_0": (["bench", "comm", "--tokens", "0"], "argument --tokens: value='0'"),
    "comm_warmup_negative": (["bench", "comm", "--warmup", "-1"], "argument --warmup:"),
    "comm_inner_0": (["bench", "comm", "--inner", "0"], "argument --inner:"),
    "comm_p2p_0": (["bench", "comm", "--p2p-mb", "0"], "argument --p2p-mb:"),
    "comm_name_with_slash": (["bench", "comm", "--name", "a/b"],
                             "argument --name: value='a/b': must be a plain file name"),
    "layer_tokens_0": (["bench", "layer", "--tokens", "0"], "argument --tokens: value='0'"),
    "layer_zipf_tau_negative": (["bench", "layer", "--zipf-tau", "-1"], "must be >= 0"),
    "layer_name_too_long": (["bench", "layer", "--name", LONG], "is 300 bytes long"),
    "model_layers_0": (["bench", "model", "--layers", "0"], "argument --layers: value='0'"),
    "model_out_under_a_file": (["bench", "model", "--out", f"{A_FILE}/x"], "is a file"),
    "model_experts_not_divisible": (["bench", "model", "--world-size", "3", "--num-experts", "8",
                                     "--device", "cpu"],
                                    "num_experts, world_size=(8, 3): contiguous placement needs"),
    "model_top_k_above_experts": (["bench", "model", "--num-experts", "8", "--top-k", "9",
                                   "--device", "cpu"], "RouterConfig.top_k=9: must lie in"),
    "fp8_sizes_0": (["bench", "experts-fp8", "--sizes", "0"], "argument --sizes: value='0'"),
    "fp8_gpt_oss_shape": (["bench", "experts-fp8", "--shapes", "gpt-oss-20b"],  # I = 2880
                          "argument --shapes: invalid choice: 'gpt-oss-20b'"),
    "experts_out_under_a_file": (["bench", "experts", "--out", f"{A_FILE}/x"], "is a file"),
    "scaling_efficiency_above_1": (["bench", "scaling", "--nic-efficiency", "1.5"],
                                   "must lie in (0, 1]"),
    "scaling_latency_nan": (["bench", "scaling", "--nic-latency-us", "nan"], "must be finite"),
    "scaling_hbm_negative": (["bench", "scaling", "--mi300x-hbm-GBps", "-1"], "must be > 0"),
    "scaling_results_missing": (["bench", "scaling", "--results", "/nonexistent-results"],
                                "is not an existing folder"),
    "scaling_json_no_folder": (["bench", "scaling", "--json", "/nonexistent-dir/s.json"],
                               "does not exist"),
    # the second audit (2026-12-08): refused, not failing in every rank or ignored
    "comm_top_k_above_experts": (["bench", "comm", "--num-experts", "4", "--top-k", "8"],
                                 "--top-k 8: must be <= --num-experts 4"),
    "layer_top_k_above_experts": (["bench", "layer", "--num-experts", "4", "--top-k", "8"],
                                  "--top-k 8: must be <= the 4 experts"),
    "decode_top_k_above_experts": (["bench", "decode", "--num-experts", "4", "--top-k", "8"],
                                   "--top-k 8: must be <= the 4 experts"),
    "comm_symm_capacity_without_symm": (["bench", "comm", "--comm", "torch",
                                         "--symm-capacity", "64"],
                                        "--symm-capacity sizes the symm backend's buffers"),
    "layer_micro_batches_without_overlap": (["bench", "layer", "--micro-batches", "3"],
                                            "--micro-batches only applies with --overlap"),
    "layer_zipf_tau_without_zipf": (["bench", "layer", "--zipf-tau", "2"],
                                    "--zipf-tau only applies with --skew zipf"),
    "layer_skew_scale_without_zipf": (["bench", "layer", "--skew-scale", "2"],
                                      "--skew-scale only applies with --skew zipf"),
    "experts_formats_without_gpt_oss": (["bench", "experts", "--shapes", "qwen3", "--formats",
                                         "mxfp4"], "--formats picks the weight formats"),
}


@pytest.mark.parametrize(("argv", "match"), list(CASES.values()), ids=list(CASES))
def test_flags_refused_while_parsing(capsys, no_ranks, argv, match):
    """Each was a crash (KeyError, ZeroDivisionError, OSError after the whole run) or a run on
    a NaN/inf gate that exited 0; now argparse's error line, exit 2, before any rank starts."""
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"rocm-moe {argv[0]}"), err
    assert match in last, err
    assert "Traceback" not in err


def test_run_on_an_fp8_checkpoint_refuses_invariant_before_any_rank(tmp_path, capsys,
                                                                     no_ranks):
    """--invariant on an FP8 checkpoint: one line, exit 2, before any rank starts (it printed
    "invariant" and ran non-invariant; then each rank loaded the checkpoint and refused)."""
    pytest.importorskip("transformers")
    from tests.test_fp8_checkpoint import save_fp8_deepseek_v3

    save_fp8_deepseek_v3(tmp_path)
    rc = main(["run", "--checkpoint", str(tmp_path), "--world-size", "2", "--tokens", "4",
               "--iters", "1", "--invariant"])
    err = capsys.readouterr().err
    assert rc == 2
    lines = [line for line in err.splitlines() if "error:" in line]
    assert lines == [err.strip().splitlines()[-1]], err
    assert lines[0].startswith(f"rocm-moe run: error: --invariant=with --checkpoint {tmp_path} "
                               "layer 1: an FP8 layer cannot run it"), err
    assert "Fix: drop --invariant" in lines[0]


@pytest.fixture(scope="module")
def deepseek_checkpoint(tmp_path_factory):
    pytest.importorskip("transformers")
    from tests.test_fp8_checkpoint import save_fp8_deepseek_v3

    d = tmp_path_factory.mktemp("deepseek_v3_bf16")
    save_fp8_deepseek_v3(d, fp8=False)
    return d


@pytest.mark.parametrize("command", ["diagnose", "sanity"])
def test_diagnose_and_sanity_check_the_router_against_the_checkpoints_config(
        deepseek_checkpoint, capsys, monkeypatch, command):
    """Given --checkpoint, the layer's RouterConfig is checked against the checkpoint's config
    (hf_config=): clean as loaded, and a config that says otherwise (routed_scaling_factor
    1.0, the default left in by mistake) is reported (neither command took --checkpoint)."""
    import importlib

    module = importlib.import_module(f"rocm_moe.cli.{command}")
    argv = [command, "--checkpoint", str(deepseek_checkpoint), "--layer", "1",
            "--world-size", "1", "--dtype", "float32"]
    assert main(argv) == 0, capsys.readouterr().out
    out = " ".join(capsys.readouterr().out.split())
    if command == "diagnose":
        assert "its RouterConfig was checked against hf_config (stage config)" in out, out
    else:
        assert "router_config" in out, out
        assert "FAIL" not in out, out
    real = module.hf_config

    def stale(spec):
        config = real(spec)
        config.routed_scaling_factor = 1.0
        return config

    monkeypatch.setattr(module, "hf_config", stale)
    assert main(argv) == 1
    out = capsys.readouterr().out
    assert "routed_scaling_factor" in out or "router_config" in out, out


def _unused_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_under(env: dict, timeout: float) -> tuple[subprocess.CompletedProcess, float]:
    full = {k: v for k, v in os.environ.items()
            if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
                         "MASTER_PORT", "TORCHELASTIC_USE_AGENT_STORE")}
    full.update(env)
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "rocm_moe.cli", "run", *SMALL, "--tokens", "4",
                           "--iters", "1", "--dtype", "float32"], env=full, capture_output=True,
                          text=True, timeout=timeout)
    return proc, time.monotonic() - t0


def test_run_under_an_inconsistent_torchrun_environment_is_refused_at_once():
    """RANK=3 WORLD_SIZE=2 waited in the rendezvous for more than 7 minutes, printing nothing."""
    proc, took = _run_under(dict(RANK="3", WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                                 MASTER_PORT=str(_unused_port())), timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith(
        "rocm-moe run: error: RANK=3: must be < WORLD_SIZE=2"), proc.stderr
    assert "Traceback" not in proc.stderr
    assert took < 30


def test_run_under_a_stale_torchrun_environment_times_out_naming_its_variables():
    """A MASTER_ADDR:MASTER_PORT nobody serves: the rendezvous gives up after its timeout
    (ROCM_MOE_RENDEZVOUS_TIMEOUT_S, here 2 s) with one line naming the variables."""
    port = _unused_port()
    proc, took = _run_under(dict(RANK="1", WORLD_SIZE="2", LOCAL_RANK="1",
                                 MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                                 ROCM_MOE_RENDEZVOUS_TIMEOUT_S="2"), timeout=60)
    assert proc.returncode == 2, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("rocm-moe run: error: rank 1 of 2 could not meet the other ranks"), \
        proc.stderr
    for var in ("MASTER_ADDR=127.0.0.1", f"MASTER_PORT={port}", "RANK=1", "WORLD_SIZE=2",
                "LOCAL_RANK=1", "Fix:"):
        assert var in last, last
    assert took < 40


def _entry_points():
    from types import SimpleNamespace as NS

    vllm_config = NS(moe_parallel_config=NS(use_ep=True, ep_size=2, ep_rank=0), device="cpu",
                     hidden_dim=8, experts_per_token=2, in_dtype=None, num_experts=8)
    sglang_config = NS(num_experts=8, num_local_experts=4, hidden_size=8, top_k=2)

    def vllm(name):
        from rocm_moe.integrations import vllm as module

        return module if name is None else getattr(module, name)

    def sglang(name):
        from rocm_moe.integrations import sglang as module

        return module if name is None else getattr(module, name)

    return {
        "vllm_make_vllm_dispatcher": ("vllm", lambda: vllm(None).make_vllm_dispatcher(
            vllm_config)),
        "vllm_RocmMoEFusedMoEMethod": ("vllm", lambda: vllm("RocmMoEFusedMoEMethod")),
        "vllm_register": ("vllm", lambda: vllm(None).register()),
        "sglang_make_sglang_dispatcher": ("sglang", lambda: sglang(None).make_sglang_dispatcher(
            sglang_config)),
        "sglang_RocmMoEDispatcher": ("sglang", lambda: sglang("RocmMoEDispatcher")),
        "sglang_register": ("sglang", lambda: sglang(None).register()),
    }


@pytest.mark.parametrize("case", list(_entry_points()))
def test_engine_entry_points_without_the_engine_say_what_to_install(monkeypatch, case):
    """make_vllm_dispatcher and register() (switch on), and SGLang's, raised a bare
    ModuleNotFoundError ("No module named 'vllm'"); now the package's ImportError."""
    import importlib.util

    engine, call = _entry_points()[case]
    if importlib.util.find_spec(engine) is not None:
        pytest.skip(f"{engine} is installed here")
    monkeypatch.setenv("ROCM_MOE_VLLM", "1")
    monkeypatch.setenv("ROCM_MOE_SGLANG", "1")
    with pytest.raises(ImportError) as err:
        call()
    assert not isinstance(err.value, ModuleNotFoundError), repr(err.value)
    assert f"pip install 'rocm_moe[{engine}]'" in str(err.value)


@pytest.mark.parametrize(("args", "match"), [
    ((8.0, 2), r"^num_experts='?8.0'?: must be an int"),
    ((8, 2.0), r"^ep_size='?2.0'?: must be an int"),
    ((8, True), r"^ep_size='?True'?: must be an int"),
])
def test_vllm_placement_refuses_non_integers(args, match):
    """vllm_placement(8.0, 2) crashed in range() (TypeError: 'float' object cannot be
    interpreted as an integer); now the package's TypeError naming the field."""
    from rocm_moe.integrations.vllm import vllm_placement

    with pytest.raises(TypeError, match=match):
        vllm_placement(*args)


CHECKPOINT_FLAGS = {  # each was ignored with --checkpoint: the checkpoint's config set it
    "run_num_experts": ["run", "--num-experts", "4"],
    "run_shared": ["run", "--shared-intermediate", "8"],
    "sanity_router": ["sanity", "--router", "mixtral"],
    "sanity_router_default": ["sanity", "--router", "qwen3"],
    "sanity_top_k": ["sanity", "--top-k", "2"],
    "diagnose_router": ["diagnose", "--router", "qwen3"],
    "diagnose_hidden": ["diagnose", "--hidden", "32"],
    "diagnose_intermediate": ["diagnose", "--intermediate", "16"],
    "diagnose_shared": ["diagnose", "--shared-intermediate", "8"],
}


@pytest.mark.parametrize("argv", list(CHECKPOINT_FLAGS.values()), ids=list(CHECKPOINT_FLAGS))
def test_flags_the_checkpoint_sets_are_refused_with_it(deepseek_checkpoint, capsys, no_ranks,
                                                       argv):
    """sanity/diagnose --router deepseek_v3-or-anything --checkpoint ran the checkpoint's
    router and printed it, the flag silently ignored (so did --num-experts, --hidden,
    --intermediate, --top-k and --shared-intermediate, on run too); now refused before any rank,
    even a value equal to the default."""
    rc = main([*argv, "--checkpoint", str(deepseek_checkpoint), "--world-size", "1"])
    err = capsys.readouterr().err
    assert rc == 2, err
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"rocm-moe {argv[0]}: error: {argv[1]}="), err
    assert "cannot be given with --checkpoint" in last, err
    assert f"Fix: drop {argv[1]}" in last, err


@pytest.mark.parametrize("command", ["run", "sanity", "diagnose"])
def test_layer_without_a_checkpoint_is_refused(capsys, no_ranks, command):
    """--layer 7 without --checkpoint ran the synthetic layer, the flag ignored (exit 0)."""
    rc = main([command, "--layer", "7", "--world-size", "1"])
    err = capsys.readouterr().err
    assert rc == 2, err
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"rocm-moe {command}: error: --layer=7: picks a layer of a "
                           "checkpoint"), err
    assert "Fix: pass --checkpoint DIR too, or drop --layer" in last, err


def test_run_has_no_router_flag(capsys, no_ranks):
    """run builds a synthetic layer with the qwen3 router or a checkpoint's: --router is not
    one of its flags (argparse refuses it, exit 2), so it cannot be ignored either."""
    with pytest.raises(SystemExit) as exc:
        main(["run", "--router", "mixtral", *SMALL])
    assert exc.value.code == 2
    assert "unrecognized arguments: --router mixtral" in capsys.readouterr().err
