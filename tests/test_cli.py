"""The CLI's commands on small shapes: exit codes and what they print."""

from __future__ import annotations

import json

import pytest
import torch

from rocm_moe import EPMoE, Experts, ExpertsOutput, RouterConfig
from rocm_moe.cli import main
from rocm_moe.comm.torch import TorchDispatcher
from rocm_moe.sanity import run_sanity

SMALL = ["--num-experts", "8", "--hidden", "32", "--intermediate", "16", "--top-k", "2"]


def test_info(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "reference" in out
    assert "local" in out
    assert "mori" in out
    # the FP8 dispatches, with the flags that pick them and why they cannot run here
    flat = " ".join(out.split())
    assert "torch-fp8 (--comm torch --fp8-dispatch) │ usable" in flat, out
    assert "mori-fp8 (--comm mori --fp8-dispatch) │ unavailable: mori" in flat, out


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float64"])
def test_sanity_passes(capsys, dtype):
    assert main(["sanity", *SMALL, "--world-size", "1", "--dtype", dtype]) == 0
    out = capsys.readouterr().out
    assert "15 passed, 0 failed" in out  # + routing, router_config, raw_slots, input_unchanged
    assert "half_weight" in out


def test_sanity_two_ranks(capsys):
    assert main(["sanity", *SMALL, "--world-size", "2"]) == 0
    out = capsys.readouterr().out
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    assert f"W=2 comm={'symm' if gpus >= 2 else 'torch'}" in out  # the ranks' default
    assert "15 passed, 0 failed" in out  # + routing, router_config, raw_slots, input_unchanged


@pytest.mark.parametrize("world_size", [1, 2])
def test_run_checks_writes_json_and_reports_every_long_step(capfd, tmp_path, world_size):
    """run checks against the oracle and writes its JSON; its progress on stderr: the layer
    being built and built (every rank), the warm-up, every iteration (none skipped, however
    fast), the oracle check starting and done. (One run for both: each spawns its ranks.)"""
    path = tmp_path / "run.json"
    rc = main(["run", *SMALL, "--world-size", str(world_size), "--tokens", "33", "--iters", "4",
               "--weight-mode", "combine", "--dtype", "float32", "--json", str(path)])
    captured = capfd.readouterr()  # (spawned ranks write to the process's stderr)
    out, err = captured.out, captured.err
    assert rc == 0, out
    assert "tokens/s" in out
    assert "PASS" in out
    data = json.loads(path.read_text())
    assert data["world_size"] == world_size
    assert data["passed"]
    for rank in data["ranks"]:
        assert set(rank["stage_ms"]) == {"route", "dispatch", "experts", "combine"}
        assert rank["rel_err"]["out"] < 1e-5
    lines = [line.split(" ", 1)[1] for line in err.splitlines()]  # without the time stamp
    building = "rank 0: building the layer (synthetic seed 0, comm="
    assert any(line.startswith(building) for line in lines), err
    for r in range(world_size):
        assert any(line.startswith(f"rank {r}/{world_size}: weights built in ")
                   for line in lines), err
    steps = ["rank 0: warm-up forward done in ",
             *(f"rank 0: iteration {i}/4 (" for i in range(1, 5)),
             "rank 0: checking against the float64 oracle",
             "rank 0: checked against the float64 oracle in "]
    at = [next(i for i, line in enumerate(lines) if line.startswith(step)) for step in steps]
    assert at == sorted(at), err  # in this order
    assert "rank 0: iteration" not in out


def test_user_error_is_one_line(capsys):
    assert main(["run", *SMALL, "--world-size", "1", "--experts", "nope"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "known experts backends are ['reference', 'aiter', 'triton']" in err


class _TwiceWeighted(Experts):
    """Applies the routing weights, then applies them again: the classic double weighting."""

    name = "twice"

    def _forward(self, x_RH, topk_ids_RK, topk_weights_RK, w13, w2, expert_map, *, mode):
        from rocm_moe.experts.reference import ReferenceExperts

        out = ReferenceExperts()._forward(x_RH, topk_ids_RK, topk_weights_RK, w13, w2,
                                          expert_map, mode=mode)
        if mode == "weighted":
            y = out.out * topk_weights_RK.sum(1, keepdim=True).to(out.out.dtype)
            return ExpertsOutput(out=y, weights_applied=True)
        return out


def test_sanity_catches_double_weighting():
    layer = EPMoE(hidden_size=32, intermediate_size=16, router=RouterConfig.mixtral(8, 2),
                  experts=_TwiceWeighted())
    rows = {(r.check, r.weight_mode): r for r in run_sanity(layer)}
    assert not rows[("half_weight", "experts")].passed  # 0.25 instead of 0.5
    assert rows[("single_expert", "experts")].passed  # weight 1 hides it: why 0.5 is tested
    assert rows[("half_weight", "combine")].passed
    assert not rows[("modes_agree", "both")].passed


def test_bench_comm_tiny(capsys, tmp_path):
    rc = main(["bench", "comm", "--world-size", "2", "--tokens", "1", "33", "--hidden", "64",
               "--num-experts", "8", "--top-k", "2", "--warmup", "1", "--iters", "2",
               "--out", str(tmp_path), "--name", "tiny"])
    assert rc == 0
    data = json.loads((tmp_path / "tiny.json").read_text())
    assert [r["tokens"] for r in data["summary"]] == [1, 33]
    for r in data["summary"]:
        assert r["torch dispatch GB/s"] > 0
        assert r["torch combine GB/s"] > 0
        assert r["a2a GB/s"] > 0


def test_bench_experts_without_a_gpu_says_so(capsys, tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is here: the benchmark would run")
    with pytest.raises(SystemExit) as exc:
        main(["bench", "experts", "--out", str(tmp_path)])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "torch.cuda.is_available() is False" in err
    assert "Traceback" not in err
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize(("flag", "name"), [("--comm", "mori"), ("--experts", "aiter")])
def test_rocm_backends_refused_clearly_without_their_library(capsys, flag, name):
    pytest.importorskip("torch")
    if backends_available(name):
        pytest.skip(f"{name} is installed here")
    assert main(["sanity", *SMALL, "--world-size", "2", flag, name]) in (1, 2)
    captured = capsys.readouterr()
    assert f"{name} is not installed" in captured.err + captured.out


def backends_available(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def test_run_under_torchrun():
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
           "2", "-m", "rocm_moe.cli", "run", *SMALL, "--tokens", "9", "--iters", "1",
           "--dtype", "float32"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # two ranks on a host with fewer than 2 GPUs are CPU ranks (gloo), with CPU backends
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    assert f"W=2 ({'nccl' if gpus >= 2 else 'gloo'})" in proc.stdout, proc.stdout
    if gpus < 2:
        assert "comm=torch (default on CPU ranks), experts=reference (default on CPU ranks)" \
            in " ".join(proc.stdout.split()), proc.stdout
    assert "PASS" in proc.stdout


COMMANDS = ["info", "sanity", "run", "diagnose", "bench"]


def test_help_lists_every_command(capsys):
    import rocm_moe.cli

    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for command in COMMANDS:
        assert f"rocm-moe {command}" in rocm_moe.cli.__doc__
        assert f"\n    {command} " in out  # argparse's list of subcommands
    assert rocm_moe.cli.__doc__.startswith(f"rocm-moe: {', '.join(COMMANDS)}.")


@pytest.mark.parametrize("command", ["sanity", "run", "diagnose"])
def test_help_documents_exit_codes(capsys, command):
    with pytest.raises(SystemExit):
        main([command, "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "Exit codes: 0" in out
    assert "2 a usage error" in out


class StandInDispatcher(TorchDispatcher):
    """A registry stand-in that is never available."""

    @classmethod
    def availability(cls) -> str | None:
        return "a test stand-in"


def test_backend_choices_come_from_the_registry(capsys, monkeypatch):
    from rocm_moe import backends

    new = backends.Backend("new_comm", "comm", "tests.test_cli", "StandInDispatcher")
    monkeypatch.setitem(backends.BACKENDS, "comm:new_comm", new)
    with pytest.raises(SystemExit):
        main(["sanity", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    for name in [*backends.names("comm"), *backends.names("experts")]:
        assert name in out
    assert "new_comm" in out
    assert main(["sanity", *SMALL, "--world-size", "1", "--comm", "new_comm"]) == 2
    assert "comm backend='new_comm': unavailable: a test stand-in" in capsys.readouterr().err


@pytest.mark.parametrize(("world_size", "comm"), [(1, "local"), (2, "torch")])
def test_layer_spec_from_arguments(world_size, comm):
    """Backends not asked for stay None until a rank chooses them from its own device."""
    from rocm_moe.cli import build_parser
    from rocm_moe.cli.spec import LayerSpec, layer_spec
    from rocm_moe.distributed import WorkerInfo

    args = build_parser().parse_args(["run", *SMALL, "--seed", "3", "--dtype", "float32"])
    spec = layer_spec(args, world_size, weight_mode="combine")
    assert spec == LayerSpec(num_experts=8, hidden_size=32, intermediate_size=16, top_k=2,
                             dtype="float32", weight_mode="combine", seed=3)
    assert spec.shape == "E=8 H=32 I=16 K=2"
    ran = spec.on_rank(WorkerInfo(0, world_size, torch.device("cpu"), "gloo"))
    assert (ran.comm, ran.experts) == (comm, "reference")
    args = build_parser().parse_args(["run", *SMALL, "--comm", comm, "--experts", "reference"])
    asked = layer_spec(args, world_size).on_rank(WorkerInfo(0, world_size,
                                                            torch.device("cpu"), "gloo"))
    assert asked.backends_chosen == f"comm={comm} (--comm), experts=reference (--experts)"


def test_bench_is_an_ordinary_subcommand():
    from rocm_moe.benchmarks import comm, experts, layer
    from rocm_moe.cli import build_parser

    parser = build_parser()
    args = parser.parse_args(["bench", "comm", "--world-size", "4", "--comm", "torch", "symm",
                              "--tokens", "1", "33", "--hidden", "64", "--num-experts", "8",
                              "--top-k", "2", "--dtype", "float32", "--warmup", "1",
                              "--iters", "2", "--inner", "3", "--symm-capacity", "40",
                              "--p2p-mb", "1", "--seed", "7", "--out", "o", "--name", "n"])
    assert (args.command, args.benchmark) == ("bench", "comm")
    assert args.func.keywords["module"] is comm
    own = {k: v for k, v in vars(args).items()
           if k not in {"func", "command", "benchmark", "_given"}}  # (_given: argtypes.Given)
    assert own == dict(world_size=4, comm=["torch", "symm"], tokens=[1, 33], hidden=64,
                       num_experts=8, top_k=2, dtype="float32", warmup=1, iters=2, inner=3,
                       symm_capacity=40, p2p_mb=1, seed=7, out="o", name="n")
    args = parser.parse_args(["bench", "experts", "--shapes", "dsv3", "--out", "o"])
    assert args.func.keywords["module"] is experts
    assert (args.shapes, args.out, args.name) == (["dsv3"], "o", "experts")
    args = parser.parse_args(["bench", "layer", "--tokens", "1", "128", "--weight-modes",
                              "combine", "--experts", "reference", "--model", "deepseek-v3",
                              "--skew", "zipf"])
    assert args.func.keywords["module"] is layer
    assert (args.tokens, args.weight_modes, args.experts, args.model, args.skew) == (
        [1, 128], ["combine"], "reference", "deepseek-v3", ["zipf"])
    with pytest.raises(SystemExit):
        parser.parse_args(["bench", "nope"])


def test_progress_goes_to_stderr(capsys):
    assert main(["run", *SMALL, "--world-size", "1", "--tokens", "9", "--iters", "2",
                 "--dtype", "float32"]) == 0
    captured = capsys.readouterr()
    assert "rank 0/1 ready" in captured.err
    assert "rank 0: iteration 2/2" in captured.err
    assert "ready" not in captured.out
    assert "iteration 2/2" not in captured.out
    assert captured.out.startswith("EPMoE E=8 H=32 I=16 K=2, 9 tokens per rank, W=1")


def test_run_with_shared_experts(capsys, tmp_path):
    path = tmp_path / "run.json"
    assert main(["run", *SMALL, "--world-size", "1", "--tokens", "9", "--iters", "1",
                 "--dtype", "float32", "--shared-intermediate", "24", "--json", str(path)]) == 0
    assert "PASS" in capsys.readouterr().out
    data = json.loads(path.read_text())
    assert "shared" in data["ranks"][0]["stage_ms"]
    assert data["config"]["shared_intermediate"] == 24


@pytest.mark.parametrize(
    ("argv", "match"),
    [
        (["--top-k", "9", "--num-experts", "8"], "--top-k=9: must be <= --num-experts=8"),
        (["--world-size", "3", "--num-experts", "8"],
         "--num-experts=8: must be divisible by the world size 3"),
        (["--device", "nope"], "--device=nope: is not a torch device"),
    ],
    ids=["topk_gt_E", "W_not_dividing_E", "device_name"],
)
def test_run_arguments_refused_before_any_rank_starts(capsys, monkeypatch, argv, match):
    from rocm_moe.cli import ranks

    def no_ranks(*a, **k):
        raise AssertionError("a rank was started")

    monkeypatch.setattr(ranks, "launch", no_ranks)
    assert main(["run", *SMALL, *argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert match in err, err
    assert "Fix:" in err, err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a CPU machine")
def test_run_on_cuda_without_a_gpu_is_a_usage_error(capsys):
    assert main(["run", *SMALL, "--world-size", "1", "--device", "cuda"]) == 2
    assert "--device=cuda: this machine has no GPU" in capsys.readouterr().err


def test_bench_layer_send_rows_and_zipf_bias():
    import torch

    from rocm_moe import Placement
    from rocm_moe.benchmarks.layer import send_rows, zipf_bias

    ids = torch.tensor([[0, 2], [2, 3], [-1, 1]])
    assert send_rows(ids, Placement.contiguous(4, 2), 0, [0, 1]) == ([2, 2], 2)
    assert send_rows(ids, Placement.contiguous(4, 2), 0, [0, 0]) == ([2, 2], 0)
    # 4 ranks on 2 nodes of 2: a token wanted by both ranks of node 1 crosses once
    ids = torch.tensor([[4, 6], [0, 7], [1, 2]])
    assert send_rows(ids, Placement.contiguous(8, 4), 0, [0, 0, 1, 1]) == ([2, 1, 1, 2], 2)
    b = zipf_bias(4, 1.0)
    assert abs(float(b.sum())) < 1e-6
    assert float(b.max() - b.min()) == pytest.approx(float(torch.log(torch.tensor(4.0))))
    assert sorted(b.tolist(), reverse=True)[1] == pytest.approx(float(b.max()) - 0.6931472)


def test_bench_layer_tiny(tmp_path):
    rc = main(["bench", "layer", "--world-size", "2", "--tokens", "1", "33", "--hidden", "64",
               "--num-experts", "8", "--intermediate", "32", "--top-k", "2", "--warmup", "1",
               "--iters", "2", "--skew", "uniform", "zipf", "--dtype", "float32",
               "--out", str(tmp_path), "--name", "tiny"])
    assert rc == 0
    data = json.loads((tmp_path / "tiny.json").read_text())
    assert data["nodes"] == [0, 0]
    rows = data["summary"]
    assert [(r["tokens"], r["skew"]) for r in rows] == [
        (1, "uniform"), (1, "zipf"), (33, "uniform"), (33, "zipf")]
    for r in rows:
        assert r["eager us"] > 0
        assert r["tokens/s/GPU"] > 0
        assert all(r[f"{st} us"] > 0 for st in ("route", "dispatch", "experts", "combine"))
        assert r["inter_node MB"] == 0
        assert r["imbalance"] >= 1
    # 2 ranks x 33 tokens x K=2 over E=8: hot experts skew the ranks' loads
    assert rows[3]["imbalance"] > rows[2]["imbalance"]
    assert (tmp_path / "tiny.png").exists()


def _bench_on_two_launchers(tmp_path, per_node: int) -> dict:
    """``bench layer`` under two torchrun launchers on this host (two emulated nodes of
    ``per_node`` gloo ranks each); its JSON."""
    import os
    import socket
    import subprocess
    import sys

    bench = ["-m", "rocm_moe.cli", "bench", "layer", "--tokens", "17", "--hidden", "64",
             "--num-experts", "8", "--intermediate", "32", "--top-k", "2", "--warmup", "1",
             "--iters", "2", "--dtype", "float32", "--out", str(tmp_path), "--name", "nodes"]
    # CPU ranks on any host: two launchers on one host would each take its GPU 0 (NCCL refuses
    # two ranks on one GPU); real emulated nodes give each launcher its own GPUs
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    for _attempt in range(3):  # torchrun's rendezvous port must be known to both launchers:
        with socket.socket() as sock:  # a free one, taken by someone else in between at worst
            sock.bind(("127.0.0.1", 0))
            port = str(sock.getsockname()[1])
        args = ["-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node",
                str(per_node), "--master-addr", "127.0.0.1", "--master-port", port]
        procs = [subprocess.Popen([sys.executable, *args, "--node-rank", str(n), *bench],
                                  env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  text=True) for n in (0, 1)]
        outs = [p.communicate(timeout=240)[0] for p in procs]
        if not any("EADDRINUSE" in out for out in outs):
            break
    assert [p.returncode for p in procs] == [0, 0], outs
    return json.loads((tmp_path / "nodes.json").read_text())


def test_bench_layer_two_emulated_nodes_under_torchrun(tmp_path):
    """Two torchrun launchers on one host, one rank each: the benchmark sees two nodes from
    the launcher and times the two-stage dispatch's collectives against the flat one."""
    data = _bench_on_two_launchers(tmp_path, 1)
    assert data["nodes"] == [0, 1]
    (row,) = data["summary"]
    assert row["inter_node MB"] > 0
    assert row["intra_node MB"] == 0
    (probe,) = data["hier_probe"]
    assert probe["flat us"] > 0
    assert probe["two-stage network us"] > 0
    # one rank a node: nothing to deduplicate, the network hop carries the flat's remote rows
    assert probe["network_rows"] * 64 * 4 == pytest.approx(row["inter_node MB"] * 1e6)


def test_bench_layer_two_emulated_nodes_of_two_ranks(tmp_path):
    """2 x 2 (the layout the two-stage question is about), on gloo: the probe's network hop
    sends each token once per other node that needs it (what the traffic count predicts, and
    fewer rows than the flat all-to-all sends across nodes), and its fan-out inside the nodes
    delivers every (token, destination rank) row of the flat dispatch exactly once."""
    data = _bench_on_two_launchers(tmp_path, 2)
    assert data["nodes"] == [0, 0, 1, 1]
    (row,) = data["summary"]
    (probe,) = data["hier_probe"]
    assert row["intra_node MB"] > 0
    assert probe["two-stage node us"] > 0
    assert probe["network_rows"] * 64 * 4 == pytest.approx(row["hier_inter MB"] * 1e6)
    assert probe["network_rows"] * 64 * 4 < row["inter_node MB"] * 1e6  # deduplicated
    assert probe["node_rows"] == probe["flat_rows"]


@pytest.mark.parametrize(
    ("argv", "match"),
    [
        (["run", "--world-size", "64"], "--world-size=64: 64 CPU ranks of this shape need about"),
        (["run", *SMALL, "--world-size", "2", "--tokens", "10000000"],
         "--world-size=2: 2 CPU ranks of this shape need about"),
        (["diagnose", *SMALL, "--world-size", "1", "--dump", "/nonexistent-dir/d"],
         "--dump: value='/nonexistent-dir/d.rank0.safetensors': its folder /nonexistent-dir does "
         "not exist or is not writable"),
    ],
    ids=["W64_default_shape", "too_many_tokens", "dump_unwritable"],
)
def test_refused_before_any_rank_starts(capsys, monkeypatch, argv, match):
    """A CPU host with 4 GiB available: the memory estimate refuses, naming the flags to
    change; an output path that cannot be written is refused before the run."""
    from rocm_moe.cli import ranks

    def no_ranks(*a, **k):
        raise AssertionError("a rank was started")

    monkeypatch.setattr(ranks, "launch", no_ranks)
    monkeypatch.setattr(ranks, "available_memory", lambda: 4 * 2**30)
    monkeypatch.setattr(ranks, "default_backend", lambda W: "gloo")
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert match in err, err
    if "CPU ranks" in match:
        assert "4.0 GiB is available" in err
        assert "lower --world-size or --tokens" in err
    assert "Fix:" in err, err


def test_memory_estimate_grows_with_ranks_and_fits_the_small_runs():
    from rocm_moe.cli.ranks import PROCESS_BYTES, memory_estimate

    shape = dict(num_experts=128, hidden_size=2048, intermediate_size=768, top_k=8, tokens=256,
                 itemsize=4)
    one, two, many = (memory_estimate(world_size=w, **shape) for w in (1, 2, 64))
    experts = 128 * 3 * 768 * 2048 * 4
    assert experts < one < experts + PROCESS_BYTES + 2**30  # one rank holds every expert
    assert two < 2 * one  # the experts are split, not copied
    assert many > 64 * PROCESS_BYTES
    small = dict(num_experts=8, hidden_size=32, intermediate_size=16, top_k=2, tokens=33,
                 itemsize=4)
    assert memory_estimate(world_size=3, **small) < 3 * PROCESS_BYTES + 2**20


# ---- defaults from the rank's own device ------------------------------------------------------
def _gpu_host(monkeypatch):
    """This host seen as a GPU host with Triton and symmetric memory: every host-level query
    says yes, so only the rank's own device can tell a CPU rank from a GPU one."""
    from rocm_moe.comm.symm import SymmDispatcher
    from rocm_moe.experts.triton import TritonExperts

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "a simulated GPU")
    monkeypatch.setattr(TritonExperts, "availability", classmethod(lambda cls: None))
    monkeypatch.setattr(SymmDispatcher, "availability", classmethod(lambda cls: None))


def test_default_backends_follow_the_rank_device(monkeypatch):
    from rocm_moe.backends import default_comm, default_experts

    _gpu_host(monkeypatch)
    cpu, gpu = torch.device("cpu"), torch.device("cuda", 0)
    assert default_experts(cpu) == ("reference", "default on CPU ranks")
    assert default_experts(gpu) == ("triton", "default on GPUs")
    assert default_experts(gpu, dtype=torch.bfloat16)[0] == "triton"
    name, why = default_experts(gpu, dtype=torch.float32)  # Triton: bf16 and fp16 only
    assert name == "reference"
    assert "triton cannot run" in why
    assert "float32" in why
    assert default_comm(1, gpu, False) == ("local", "one rank")
    assert default_comm(1, cpu, False) == ("local", "one rank")
    assert default_comm(2, cpu, False) == ("torch", "default on CPU ranks")
    assert default_comm(2, gpu, False)[0] == "symm"
    assert default_comm(4, gpu, True)[0] == "torch"
    assert "several hosts" in default_comm(4, gpu, True)[1]
    with pytest.raises(ValueError, match="world_size=0: must be >= 1"):
        default_comm(0, cpu, False)


def test_default_backends_fall_back_where_the_fast_ones_cannot_run(monkeypatch):
    from rocm_moe.backends import default_comm, default_experts
    from rocm_moe.comm.symm import SymmDispatcher
    from rocm_moe.experts.triton import TritonExperts

    monkeypatch.setattr(TritonExperts, "availability", classmethod(lambda cls: "no triton"))
    monkeypatch.setattr(SymmDispatcher, "availability", classmethod(lambda cls: "no symm"))
    gpu = torch.device("cuda", 0)
    assert default_experts(gpu) == ("reference", "triton cannot run: no triton")
    assert default_comm(2, gpu, False) == ("torch", "symm cannot run: no symm")


def test_ranks_on_cpus_of_a_gpu_host_pick_cpu_backends(monkeypatch):
    """On a host with one GPU, two ranks are CPU ranks (gloo); a rank on a CPU picks the
    reference experts and torch whatever the host has, one on a GPU triton (and symm, torch
    across hosts) from its own device and the dtype it computes in."""
    from rocm_moe.cli import build_parser, ranks
    from rocm_moe.cli.spec import layer_spec
    from rocm_moe.distributed import WorkerInfo

    _gpu_host(monkeypatch)
    assert ranks.spawn_backend(2) == "gloo"
    assert ranks.spawn_backend(1) == "nccl"
    assert ranks.spawn_backend(1, "cpu") == "gloo"  # --device cpu: CPU ranks on a GPU host
    spec = layer_spec(build_parser().parse_args(["run", *SMALL]), 2)
    cpu_rank = spec.on_rank(WorkerInfo(1, 2, torch.device("cpu"), "gloo"))
    assert cpu_rank.backends_chosen == ("comm=torch (default on CPU ranks), "
                                        "experts=reference (default on CPU ranks)")
    gpu_rank = spec.on_rank(WorkerInfo(1, 2, torch.device("cuda", 1), "nccl"))
    assert (gpu_rank.comm, gpu_rank.experts) == ("symm", "triton")  # dtype auto: bf16
    assert "experts=triton (default on GPUs)" in gpu_rank.backends_chosen
    f32 = layer_spec(build_parser().parse_args(["run", *SMALL, "--dtype", "float32"]), 2)
    assert f32.on_rank(WorkerInfo(0, 2, torch.device("cuda", 0), "nccl")).experts == "reference"
    for k, v in dict(RANK="0", WORLD_SIZE="4", LOCAL_WORLD_SIZE="2", MASTER_ADDR="h").items():
        monkeypatch.setenv(k, v)
    assert ranks.multi_host()
    across = spec.on_rank(WorkerInfo(0, 4, torch.device("cuda", 0), "nccl"))
    assert (across.comm, across.experts) == ("torch", "triton")
    assert "several hosts" in across.comm_why


def test_torchrun_ranks_without_a_gpu_each_are_cpu_ranks(monkeypatch):
    """torchrun starting 2 ranks on a host with one GPU: gloo on CPUs (NCCL would put rank 1 on
    a cuda:1 that does not exist); a GPU each: NCCL."""
    from rocm_moe import distributed

    _gpu_host(monkeypatch)
    monkeypatch.setattr(distributed, "_init", lambda rank, world, backend, timeout, store: backend)
    monkeypatch.setattr(distributed, "_env_store", lambda *a: None)
    for k, v in dict(RANK="1", WORLD_SIZE="2", LOCAL_WORLD_SIZE="2", MASTER_ADDR="h",
                     MASTER_PORT="29500").items():
        monkeypatch.setenv(k, v)
    assert distributed.init_from_env() == "gloo"
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert distributed.init_from_env() == "nccl"
    assert distributed.init_from_env(backend="gloo") == "gloo"


def test_device_cpu_spawns_cpu_ranks_on_a_gpu_host(capsys, monkeypatch):
    """--device cpu with two ranks on a host with 2 GPUs: gloo ranks on the CPUs (not NCCL),
    CPU backends; --device cuda needs a GPU per rank, cuda:N names one rank's."""
    _gpu_host(monkeypatch)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert main(["sanity", *SMALL, "--world-size", "2", "--device", "cpu"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "W=2 comm=torch experts=reference" in out
    assert "backends: comm=torch (default on CPU ranks), experts=reference (default on CPU " \
        "ranks)" in out
    for argv, match in ((["--world-size", "3", "--device", "cuda"],
                         "--device=cuda: 3 ranks need a GPU each, this machine has 2"),
                        (["--world-size", "2", "--device", "cuda:1"],
                         "--device=cuda:1: names one GPU; 2 spawned ranks take one GPU each")):
        assert main(["sanity", "--num-experts", "12", *argv]) == 2
        assert match in capsys.readouterr().err


def test_bench_layer_on_cpu_ranks_of_a_gpu_host(tmp_path, monkeypatch, capsys):
    """bench layer with 2 ranks on a one-GPU host: the ranks run on CPUs and pick torch and the
    reference experts themselves (the launcher's GPU no longer decides for them)."""
    _gpu_host(monkeypatch)
    assert main(["bench", "layer", "--world-size", "2", "--tokens", "3", "--hidden", "32",
                 "--num-experts", "8", "--intermediate", "16", "--top-k", "2", "--warmup", "0",
                 "--iters", "1", "--dtype", "float32", "--out", str(tmp_path),
                 "--name", "cpu_ranks"]) == 0
    data = json.loads((tmp_path / "cpu_ranks.json").read_text())
    assert data["config"]["experts"] == "reference"
    assert data["config"]["comm"] == ["torch"]
    assert [r["comm"] for r in data["summary"]] == ["torch"]
    out = " ".join(capsys.readouterr().out.split())
    assert "experts=reference (default on CPU ranks)" in out
    assert "backends: comm torch (default on CPU ranks), experts reference (default on CPU " \
        "ranks)" in out


def test_info_tells_the_defaults(capsys, monkeypatch):
    from rocm_moe.cli.info import default_rows

    assert main(["info"]) == 0
    assert "defaults here" in capsys.readouterr().out
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # a CPU host
    cpu = "reference (default on CPU ranks)"
    assert default_rows() == [("1 (--world-size 1)", "cpu", "local (one rank)", cpu),
                              ("2 spawned (gloo)", "cpu", "torch (default on CPU ranks)", cpu)]
    _gpu_host(monkeypatch)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    gpu = "triton (default on GPUs)"
    assert default_rows() == [
        ("1 (--world-size 1)", "cuda", "local (one rank)", gpu),
        ("2 spawned (NCCL, a GPU each)", "cuda",
         "symm (default on the GPUs of one host: CUDA-graph capturable)", gpu),
        ("3 spawned, or --device cpu (gloo)", "cpu", "torch (default on CPU ranks)", cpu),
        ("torchrun across hosts (NCCL)", "cuda",
         "torch (ranks on several hosts: symm reaches the GPUs of one host only)", gpu)]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_run_on_one_gpu_uses_triton_by_default(capsys):
    """Issue 27: `rocm-moe run` on one GPU runs the Triton experts, not the reference."""
    assert main(["run", "--world-size", "1", "--tokens", "16", "--iters", "1"]) == 0
    out = capsys.readouterr().out
    assert "experts=triton (default on GPUs)" in out, out
    assert "comm=local (one rank)" in out, out
