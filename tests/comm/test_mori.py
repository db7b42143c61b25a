"""MoriDispatcher: pure config logic, and the adapter driving a fake op that enforces MORI's
contract on spawned gloo ranks (W = 2, 4), with AITER's fake for the experts."""

from __future__ import annotations

import pytest
import torch

from rocm_moe import EPMoE, ExpertsOutput, Placement, RouterConfig, route
from rocm_moe import synthetic as syn
from rocm_moe.comm.mori import (
    MoriDispatcher,
    check_heap,
    forward_padded,
    gpus_per_node,
    heap_bytes,
    mori_config,
)
from rocm_moe.comm.torch import TorchDispatcher
from rocm_moe.distributed import launch
from rocm_moe.experts.aiter import AiterExperts
from rocm_moe.experts.reference import dense_moe_reference
from tests.dist_checks import collect_checks, run_checks
from tests.fakes import (
    ContractError,
    FakeFusedMoe,
    FakeMori,
    KernelType,
    _op_bytes,
    fake_mori_op,
    fake_shuffle_weight,
)

E, K, H, I, CAP = 16, 4, 8, 6, 40


# ---- pure logic ---------------------------------------------------------------------------------
def test_config_deepseek_ep8():
    cfg = mori_config(Placement.contiguous(256, 8), 5, hidden_size=7168, top_k=8,
                      dtype=torch.bfloat16, max_tokens_per_rank=4096)
    assert cfg == dict(data_type=torch.bfloat16, rank=5, world_size=8, hidden_dim=7168,
                       scale_dim=0, scale_type_size=1, max_token_type_size=2,
                       max_num_inp_token_per_rank=4096, num_experts_per_rank=32,
                       num_experts_per_token=8, kernel_type="IntraNode", gpu_per_node=8,
                       block_num=80, warp_num_per_block=16)  # the engines' (issue 32 item 2)
    across = mori_config(Placement.contiguous(256, 16), 0, hidden_size=7168, top_k=8,
                         dtype=torch.bfloat16, max_tokens_per_rank=128, gpu_per_node=8)
    assert across["kernel_type"] == "InterNodeV1"
    # Defect 1: MORI's own launch settings for the RDMA kernels (rdma_block_num 0 would hang).
    assert (across["block_num"], across["rdma_block_num"], across["warp_num_per_block"]) == \
        (96, 64, 8)


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        (dict(placement=Placement.from_lists([[0, 3], [1, 2]], 4)), "non-contiguous"),
        (dict(dtype=torch.float16), "dtype"),
        (dict(max_tokens_per_rank=None), "max_tokens_per_rank"),
        (dict(kernel_type="Fast"), "kernel_type"),
        (dict(gpu_per_node=8), "power of two that divides W=2"),  # defect 5
        (dict(gpu_per_node=3), "gpu_per_node"),
        (dict(gpu_per_node=1, kernel_type="IntraNode"), "spans 2 nodes"),
        (dict(gpu_per_node=1, kernel_type="IntraNodeLL"), "spans 2 nodes"),
    ],
    ids=["placement", "dtype", "capacity", "kernel", "gpn_gt_W", "gpn_not_pow2", "intra_across",
         "intra_ll_across"],
)
def test_config_errors(kw, match):
    args = dict(placement=Placement.contiguous(4, 2), hidden_size=8, top_k=2,
                dtype=torch.bfloat16, max_tokens_per_rank=16)
    args.update(kw)
    with pytest.raises(ValueError, match=match):
        mori_config(args.pop("placement"), 0, **args)


@pytest.mark.parametrize(
    ("W", "kw", "match"),
    [(16, {}, "at most 8"), (16, dict(gpu_per_node=16), "at most 8"),
     (16, dict(gpu_per_node=16, kernel_type="InterNodeV1"), "at most 8"),
     (16, dict(gpu_per_node=4, kernel_type="InterNode"), "MAX_GPUS_PER_NODE"),
     (32, dict(gpu_per_node=4, kernel_type="InterNode"), "MAX_GPUS_PER_NODE")],
    ids=["intra_W16", "gpn16", "v1_gpn16", "internode_gpn4", "internode_W32_gpn4"])
def test_config_refuses_nodes_past_mori_limit(W, kw, match):
    """Issue 32 item 5: MORI's intra-node kernels keep per-peer state in arrays of
    MAX_GPUS_PER_NODE = 8 (intranode.hpp ~40, 110; intranode_ll.hpp kMaxGpusPerNode at
    624002c8), and the InterNode kernel puts rank r on node r // 8 whatever gpu_per_node says
    (internode.hpp ~67, 140)."""
    with pytest.raises(ValueError, match=match):
        mori_config(Placement.contiguous(2 * W, W), 0, hidden_size=8, top_k=2,
                    dtype=torch.bfloat16, max_tokens_per_rank=16, **kw)
    ok = mori_config(Placement.contiguous(2 * W, W), 0, hidden_size=8, top_k=2,
                     dtype=torch.bfloat16, max_tokens_per_rank=16, gpu_per_node=8,
                     kernel_type=kw.get("kernel_type", "auto"))
    assert ok["gpu_per_node"] == 8


def test_info_shows_the_launch_config(monkeypatch):
    """Issue 32 item 2: ``rocm-moe info`` says how MORI launches each kernel type."""
    from rocm_moe.cli.info import mori_launch_table
    from rocm_moe.comm.mori import launch_description

    monkeypatch.delenv("MORI_EP_LAUNCH_CONFIG_MODE", raising=False)
    assert "MI300X IntraNode EP8 tables" in launch_description("IntraNode", 8)
    assert "fixed 96 blocks (64 RDMA) x 8 warps" in launch_description("InterNodeV1", 16)
    rows = [tuple(c._cells) for c in mori_launch_table().columns]
    assert any("AUTO" in cell for cell in rows[-1])
    monkeypatch.setenv("MORI_EP_LAUNCH_CONFIG_MODE", "MANUAL")
    assert "combine the config's 80 x 16" in launch_description("IntraNode", 8)
    monkeypatch.setenv("MORI_EP_LAUNCH_CONFIG_MODE", "auto")
    with pytest.raises(ValueError, match="MORI_EP_LAUNCH_CONFIG_MODE"):
        launch_description("IntraNode", 8)


def test_max_total_recv_tokens_config():
    """Issue 32 item 9: MORI's max_total_recv_tokens M sizes the receive buffers W x
    min(ceil(M / W), T) rows (dispatch_combine.hpp MaxNumTokensToRecvPerRank, ~160 at
    624002c8; dispatch_combine.cpp ~305-381), the send side stays W x T; adopted for the
    intra-node kernels."""
    from types import SimpleNamespace

    base = _cfg()
    small = mori_config(Placement.contiguous(256, 8), 0, hidden_size=7168, top_k=8,
                        dtype=torch.bfloat16, max_tokens_per_rank=4096,
                        max_total_recv_tokens=6 * 4096)
    assert small["max_total_recv_tokens"] == 6 * 4096
    fake_cfg = SimpleNamespace(**{**small, "kernel_type": KernelType.IntraNode})
    assert heap_bytes(small) == _op_bytes(fake_cfg)
    saved = heap_bytes(base) - heap_bytes(small)
    assert saved > 2 * 4096 * 7168 * 2 * 2  # two of eight rank-slices of rows and staging
    for kw, match in ((dict(max_total_recv_tokens=0), r"\[1, "),
                      (dict(max_total_recv_tokens=8 * 4096 + 1), "W x max_tokens_per_rank"),
                      (dict(max_total_recv_tokens=4096.0), "an int"),
                      (dict(max_total_recv_tokens=4096, gpu_per_node=4), "per source rank")):
        with pytest.raises(ValueError, match=match):
            mori_config(Placement.contiguous(256, 8), 0, hidden_size=7168, top_k=8,
                        dtype=torch.bfloat16, max_tokens_per_rank=4096, **kw)


def test_gpus_per_node_from_hosts():
    """Defect 5: gpu_per_node comes from the group, not a constant 8."""
    assert gpus_per_node(["a"] * 8 + ["b"] * 8) == 8
    assert gpus_per_node(["a"] * 4) == 4
    for hosts in (["a", "b", "a", "b"], ["a", "a", "a", "b"]):
        with pytest.raises(ValueError, match="contiguous runs per host"):
            gpus_per_node(hosts)


def _cfg(W=8, T=4096, H=7168, dtype=torch.bfloat16, kernel_type="auto", gpn=None):
    return mori_config(Placement.contiguous(32 * W, W), 0, hidden_size=H, top_k=8,
                       dtype=dtype, max_tokens_per_rank=T, kernel_type=kernel_type,
                       gpu_per_node=gpn)


@pytest.mark.parametrize(("W", "kernel_type", "gpn"),
                         [(8, "auto", None), (16, "auto", 8), (16, "InterNodeV1LL", 8),
                          (8, "AsyncLL", None), (8, "InterNode", None), (8, "IntraNodeLL", None)],
                         ids=["intra_EP8", "v1_EP16", "v1ll_EP16", "asyncll_EP8", "inter_EP8",
                              "intra_ll_EP8"])
def test_heap_bytes_match_the_fake_buffer_by_buffer(W, kernel_type, gpn):
    from types import SimpleNamespace

    cfg = _cfg(W=W, kernel_type=kernel_type, gpn=gpn)
    fake_cfg = SimpleNamespace(**{**cfg, "kernel_type": getattr(KernelType, cfg["kernel_type"])})
    assert heap_bytes(cfg) == _op_bytes(fake_cfg)


def test_heap_sized_by_dtype_and_refused_with_the_size_to_set(monkeypatch):
    """Defect 4: bf16 tokens halve MORI's buffers; an overflowing process is refused before
    MORI allocates, with the MORI_SHMEM_HEAP_SIZE to export."""
    import re

    from rocm_moe.comm.mori import _PROCESS

    bf16, fp32 = heap_bytes(_cfg()), heap_bytes(_cfg(dtype=torch.float32))
    assert 0.95e9 < bf16 < 1.1e9  # DeepSeek-V3, EP8, 4096 tokens per rank
    assert 1.9e9 < fp32 < 2.1e9  # what max_token_type_size=4 asked for
    monkeypatch.delenv("MORI_SHMEM_HEAP_SIZE", raising=False)
    monkeypatch.delenv("MORI_SHMEM_MODE", raising=False)
    process = FakeMori()  # stands for one process's mori module
    for _ in range(4):  # four such layers fit the default 4 GiB heap, a fifth does not
        need = check_heap(process, _cfg())
        _PROCESS[process].heap_used += need  # what build_mori_op records
        _PROCESS[process].ops += 1
    with pytest.raises(ValueError, match=r"MORI_SHMEM_HEAP_SIZE=\d+G") as err:
        check_heap(process, _cfg())
    assert "4 earlier ops" in str(err.value)
    monkeypatch.setenv("MORI_SHMEM_HEAP_SIZE", re.search(r"=(\d+G)", str(err.value)).group(1))
    assert check_heap(process, _cfg()) == bf16
    monkeypatch.setenv("MORI_SHMEM_MODE", "isolation")
    monkeypatch.setenv("MORI_SHMEM_HEAP_SIZE", "1M")
    assert check_heap(process, _cfg()) == bf16


def test_heap_bytes_by_hand():
    """Issue 32 item 6: every symmetric allocation of an op, each rounded up to 256 B (the
    static heap's VA manager, src/shmem/memory.cpp ~37 at 624002c8), including the cross-device
    barrier (64 B x W) and the inter-node chunk flags (nodes x T x 8 B), dispatch_combine.cpp
    InitializeBarrier. W = 2, T = 3, H = 8 bf16, K = 2, IntraNode: 16 allocations, each under
    256 B."""
    from types import SimpleNamespace

    cfg = mori_config(Placement.contiguous(4, 2), 0, hidden_size=8, top_k=2,
                      dtype=torch.bfloat16, max_tokens_per_rank=3)
    fake_cfg = SimpleNamespace(**{**cfg, "kernel_type": KernelType.IntraNode})
    assert heap_bytes(cfg) == _op_bytes(fake_cfg) == 16 * 256
    big = _cfg()  # DeepSeek-V3 EP8: the barrier and chunk flags are there too
    assert heap_bytes(big) - heap_bytes({**big, "max_num_inp_token_per_rank": 4095}) > \
        (8 * 7168 + 7168) * 2  # the token rows, and more: flags, maps, staging


@pytest.mark.parametrize(("text", "size"), [("6G", 6 << 30), ("512MiB", 512 << 20),
                                             ("1gb", 1 << 30), ("1048576", 1 << 20),
                                             ("6GIB", 6), ("6gB", 6), ("6Gb", 6 << 30),
                                             ("6gib", 6 << 30), ("2KiB", 2048), ("3k", 3072)])
def test_heap_size_read_as_mori_reads_it(text, size, monkeypatch):
    """Issue 32 item 6: MORI's ParseSizeString (src/shmem/init.cpp ~96) is case-sensitive past
    the forms it lists: "6GIB" is 6 bytes (stoull stops at the letters)."""
    from rocm_moe.comm.mori import heap_limit
    from tests.fakes import _heap_size

    monkeypatch.delenv("MORI_SHMEM_MODE", raising=False)
    monkeypatch.setenv("MORI_SHMEM_HEAP_SIZE", text)
    assert heap_limit() == _heap_size() == size


@pytest.mark.parametrize(("mode", "size", "limit"),
                         [("ISOLATION", None, None), ("isolation", "1G", None),
                          ("Isolation", None, 4 << 30), ("vmm_heap", None, 4 << 30),
                          ("VMM_HEAP", "8G", 8 << 30), ("bogus", None, 4 << 30)])
def test_heap_mode_read_as_mori_reads_it(mode, size, limit, monkeypatch):
    """Issue 32 item 6: MORI_SHMEM_MODE matches only its lower- or upper-case names, anything
    else is the static heap (init.cpp ~616); VMM mode falls back to the static heap (4 GiB by
    default) where VMM is unsupported (init.cpp ~282, 365), which no CPU can tell: the limit is
    the fallback's unless MORI_SHMEM_HEAP_SIZE sizes both."""
    from rocm_moe.comm.mori import heap_limit
    from tests.fakes import _heap_size

    monkeypatch.setenv("MORI_SHMEM_MODE", mode)
    if size is None:
        monkeypatch.delenv("MORI_SHMEM_HEAP_SIZE", raising=False)
    else:
        monkeypatch.setenv("MORI_SHMEM_HEAP_SIZE", size)
    assert heap_limit() == _heap_size() == limit


def test_heap_check_counts_shmem_own_bytes(monkeypatch):
    """Issue 32 item 6: the static heap starts 256 B in and shmem takes a 1 KiB sync buffer
    (init.cpp ~262, 505) before any op: an op of exactly the heap's size does not fit."""
    monkeypatch.delenv("MORI_SHMEM_MODE", raising=False)
    cfg = mori_config(Placement.contiguous(4, 2), 0, hidden_size=8, top_k=2,
                      dtype=torch.bfloat16, max_tokens_per_rank=3)
    monkeypatch.setenv("MORI_SHMEM_HEAP_SIZE", str(heap_bytes(cfg)))
    with pytest.raises(ValueError, match="MORI_SHMEM_HEAP_SIZE"):
        check_heap(FakeMori(), cfg)
    monkeypatch.setenv("MORI_SHMEM_HEAP_SIZE", str(heap_bytes(cfg) + 256 + 1024))
    assert check_heap(FakeMori(), cfg) == heap_bytes(cfg)


# ---- multi-rank, through the fakes --------------------------------------------------------------
def _mori(info, cls=MoriDispatcher, dtype=torch.float32, mori=None, **kw):
    """A dispatcher on a fresh fake ``mori`` module (one per simulated process)."""
    p = Placement.contiguous(E, kw.pop("world_size", info.world_size))
    return cls(p, hidden_size=H, top_k=K, dtype=dtype, max_tokens_per_rank=CAP,
               mori=mori or FakeMori(), **kw)


def _aiter():
    return AiterExperts(fused_moe=FakeFusedMoe(), shuffle_weight=fake_shuffle_weight)


def _batch(rank, T, seed, empty=0.2):
    g = torch.Generator().manual_seed(seed * 100 + rank)
    ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)]) if T else \
        torch.empty(0, K, dtype=torch.int64)
    if T:
        ids[torch.rand(T, K, generator=g) < empty] = -1
    x = torch.randn(T, H, generator=g)
    return x, torch.rand(T, K, generator=g), ids


def _identity_round_trip(info, seed, d, batches=(33, 7, 1, 40, 12, 33)):
    for i, T in enumerate(batches):
        T = 0 if (info.rank == 0 and i == 1) else T
        x, w, ids = _batch(info.rank, T, seed + i)
        res = d.dispatch(x, w, ids)
        assert not res.x.isnan().any(), "only the delivered rows are exposed"
        local = d.expert_map.local_ids(res.topk_ids) >= 0
        assert bool(local.any(1).all()), "every delivered row has a local expert"
        U = torch.tensor([d.placement.owner(r[r >= 0]).unique().numel() for r in ids])
        y = d.combine(ExpertsOutput(out=res.x.clone(), weights_applied=True), res.handle)
        assert torch.equal(y, x * U[:, None].float())
    assert d.op.calls.count("dispatch") == len(batches)
    return d.op.calls


def _check_identity_round_trip(info, seed):
    d = _mori(info)
    assert d.kernel_type == "IntraNode"
    assert d.mori_config["gpu_per_node"] == info.world_size  # defect 5: from the hosts
    _identity_round_trip(info, seed, d)


def _check_internode_v1_gets_launch_parameters(info, seed):
    """Defect 1: with rdma_block_num 0 (MORI's MANUAL default) InterNodeV1 would hang."""
    for kernel_type in ("auto", "InterNodeV1LL"):
        d = _mori(info, gpu_per_node=1, kernel_type=kernel_type)  # one GPU per node
        assert d.kernel_type in ("InterNodeV1", "InterNodeV1LL")
        _identity_round_trip(info, seed, d, batches=(9, 0, 17))


def _strided(ids: torch.Tensor) -> torch.Tensor:
    """The same int32 ids as a column slice of a wider tensor (a strided view, as a caller
    slicing [T, K + extra] routing output holds them)."""
    wide = torch.cat([ids, torch.full_like(ids, 7)], dim=1).to(torch.int32)
    return wide[:, :ids.shape[1]]


def _check_internode_v1_non_contiguous_ids(info, seed):
    """Issue 32 item 1: MORI's kernels read the ids' data_ptr() as a dense row-major [T, K]
    array, in dispatch and in combine (internode_v1.cpp ~125, 1291 at 624002c8; InterNodeV1
    combine walks them). The caller's strided int32 view must reach MORI contiguous at combine
    too: the handle keeps what dispatch used. MORI's own round-trip test, combine(dispatch(x))
    == x * U, with strided ids on InterNodeV1 and IntraNode."""
    for kw in (dict(gpu_per_node=1), {}):
        d = _mori(info, **kw)
        for i, T in enumerate((9, 33, 1, 40)):
            x, w, ids = _batch(info.rank, T, seed + i)
            sids = _strided(ids)
            assert T < 2 or not sids.is_contiguous()
            res = d.dispatch(x, w, sids)
            U = torch.tensor([d.placement.owner(r[r >= 0]).unique().numel() for r in ids])
            y = d.combine(ExpertsOutput(out=res.x.clone(), weights_applied=True), res.handle)
            assert torch.equal(y, x * U[:, None].float()), (d.kernel_type, T)
    op = fake_mori_op(dict(d.mori_config))  # the fake reads ids as MORI does: refused
    x, w, ids = _batch(info.rank, 9, seed)
    try:
        op.dispatch(x, w, None, _strided(ids))
    except ContractError as exc:
        return str(exc)
    raise AssertionError("the fake accepted strided ids")


def _check_intranode_launch_tuned(info, seed):
    """Issue 32 item 2: MORI reads MORI_EP_LAUNCH_CONFIG_MODE once, in the op constructor
    (python/mori/ops/dispatch_combine.py ~535 at 624002c8). The adapter builds its op in AUTO
    mode (MORI's tuned tables per token count: python/mori/ops/tuning_configs/gfx942_mi300x_
    IntraNode_ep{2,4,8}_*.json) and leaves the environment as it was; a user's MANUAL is kept,
    and then the config carries the engines' 80 blocks x 16 warps (combine's; dispatch keeps
    its own 256 x 16, DC ``_intranode_dispatch_default_launch``)."""
    import os

    var = "MORI_EP_LAUNCH_CONFIG_MODE"
    assert var not in os.environ
    d = _mori(info)
    assert var not in os.environ, "the environment is left as it was"
    assert d.op.launch_mode == d.launch_mode == "AUTO"
    _identity_round_trip(info, seed, d, batches=(9,))
    assert d.op.launches == [("dispatch", "tuned", "tuned"), ("combine", "tuned", "tuned")]
    os.environ[var] = "MANUAL"
    try:
        m = _mori(info)
    finally:
        del os.environ[var]
    assert m.op.launch_mode == m.launch_mode == "MANUAL"
    _identity_round_trip(info, seed, m, batches=(9,))
    assert m.op.launches == [("dispatch", 256, 16), ("combine", 80, 16)]
    os.environ[var] = "auto"  # MORI raises in its constructor: refused before it
    mori = FakeMori()
    try:
        _mori(info, mori=mori)
    except ValueError as exc:
        message = str(exc)
    else:
        raise AssertionError("a bad launch mode was accepted")
    finally:
        del os.environ[var]
    assert mori.built == 0
    if info.rank == 0:  # ranks that disagree refuse together, before MORI's barriers
        os.environ[var] = "MANUAL"
    try:
        _mori(info, mori=FakeMori())
    except ValueError as exc:
        disagree = str(exc)
    else:
        raise AssertionError("ranks with different launch modes were accepted")
    finally:
        os.environ.pop(var, None)
    assert "launch_mode by rank" in disagree
    return message


def _check_intranode_ll_round_trip(info, seed):
    """Issue 32 item 3: IntraNodeLL is a kernel type upstream (EpDispatchCombineKernelType,
    with an MI300X EP8 tuned table, gfx942_mi300x_IntraNodeLL_ep8_*.json at 624002c8): the
    IntraNode buffers (dispatch_combine.cpp ~321, 397), within one node."""
    d = _mori(info, kernel_type="IntraNodeLL")
    assert d.kernel_type == d.op.kt == "IntraNodeLL"
    _identity_round_trip(info, seed, d, batches=(9, 0, 33))


def _check_async_ll_receives_before_reading(info, seed):
    """Defect 2: AsyncLL's dispatch() only sends; dispatch_recv / combine_recv complete it."""
    d = _mori(info, kernel_type="AsyncLL")
    calls = _identity_round_trip(info, seed, d, batches=(9, 3, 17))
    assert [c for c in calls if c != "reset"][:4] == ["dispatch", "dispatch_recv", "combine",
                                                     "combine_recv"]


def _check_layer_matches_torch_backend(info, seed):
    x = syn.tokens(seed, info.rank, 29, H)
    for mode in ("experts", "combine"):
        outs = []
        for disp in (_mori(info), TorchDispatcher(Placement.contiguous(E, info.world_size),
                                                  hidden_size=H, top_k=K, dtype=torch.float32)):
            layer = EPMoE(hidden_size=H, intermediate_size=I, router=RouterConfig.qwen3_moe(E, K),
                          dispatcher=disp, weight_mode=mode)
            layer.reset_parameters(seed=3)
            outs.append(layer(x))
        torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-6)


def _check_mori_aiter_pipeline(info, seed):
    """MORI + AITER as vLLM/SGLang pair them, against the float64 oracle, both weight modes."""
    x = syn.tokens(seed, info.rank, 31, H).bfloat16()
    for mode in ("experts", "combine"):
        layer = EPMoE(hidden_size=H, intermediate_size=I, router=RouterConfig.qwen3_moe(E, K),
                      dispatcher=_mori(info, dtype=torch.bfloat16),
                      experts=_aiter(), weight_mode=mode,
                      dtype=torch.bfloat16)
        layer.reset_parameters(seed=3)
        y = layer(x)
        routing = route(layer.gate(x), layer.router)  # the layer's routing, for the oracle
        ref, _ = dense_moe_reference(x, routing.topk_weights, routing.topk_ids, expert_weights=(
            lambda g: tuple(t.bfloat16() for t in syn.expert_weights(3, g, H, I))))
        err = ((y.double() - ref).norm() / ref.norm()).item()
        assert err < 2e-2, (mode, err)


def _check_return_raw_refused_before_any_collective(info, seed):
    layer = EPMoE(hidden_size=H, intermediate_size=I, router=RouterConfig.qwen3_moe(E, K),
                  dispatcher=_mori(info))
    try:
        layer(syn.tokens(seed, info.rank, 5, H), return_raw=True)
    except ValueError as exc:
        message = str(exc)
    else:
        raise AssertionError("return_raw was accepted")
    assert "one summed row per token" in message
    assert layer.dispatcher.op.calls == [], "refused before MORI ran"


class _DispatchedIdsToCombine(MoriDispatcher):
    def _combine(self, y_RH, handle):  # the bug of mori#475 / vllm#52639
        out, _ = self.op.combine(y_RH, None, handle.recv_topk_ids, call_reset=True)
        return out[:handle.num_tokens]


class _Int64Ids(MoriDispatcher):
    def _dispatch(self, x_TH, topk_weights_TK, topk_ids_TK, batch_id):
        return super()._dispatch(x_TH, topk_weights_TK, topk_ids_TK.long(), batch_id)


class _NoReset(MoriDispatcher):
    def _combine(self, y_RH, handle):
        out, _ = self.op.combine(y_RH, None, handle.topk_ids, call_reset=False)
        return out[:handle.num_tokens].clone()


def _expect_error(info, seed, cls, batches=1, **kw):
    d = _mori(info, cls=cls, **kw)
    try:
        for i in range(batches):
            x, w, ids = _batch(info.rank, 9, seed + i, empty=0.0)
            res = d.dispatch(x, w, ids)
            d.combine(ExpertsOutput(out=res.x.clone(), weights_applied=True), res.handle)
    except (ContractError, ValueError) as exc:
        return str(exc)
    raise AssertionError(f"{cls.__name__} passed the fake")


def _check_fake_catches_dispatched_ids(info, seed):
    return _expect_error(info, seed, _DispatchedIdsToCombine)


def _check_fake_catches_int64_ids(info, seed):
    return _expect_error(info, seed, _Int64Ids)


def _check_reset_is_not_needed(info, seed):
    """MORI's reset kernel is empty and combine zeroes its counter: no reset, same results."""
    d = _mori(info, cls=_NoReset)
    _identity_round_trip(info, seed, d, batches=(9, 17))
    assert "reset" not in d.op.calls


def _check_adapter_guards(info, seed):
    d = _mori(info)
    msgs = {}
    x, w, ids = _batch(info.rank, CAP + 1, seed)
    try:
        d.dispatch(x, w, ids)
    except ValueError as exc:
        msgs["capacity"] = str(exc)
    assert d.op.calls == [], "capacity refused before MORI ran"
    x, w, ids = _batch(info.rank, 5, seed)
    first = d.dispatch(x, w, ids)
    try:
        d.dispatch(x, w, ids)
    except ValueError as exc:
        msgs["two_in_flight"] = str(exc)
    d.combine(ExpertsOutput(out=first.x.clone(), weights_applied=True), first.handle)
    second = d.dispatch(x, w, ids)
    try:
        d.combine(ExpertsOutput(out=second.x.clone(), weights_applied=True), first.handle)
    except ValueError as exc:
        msgs["stale_handle"] = str(exc)
    d.combine(ExpertsOutput(out=second.x.clone(), weights_applied=True), second.handle)
    return msgs


def _check_abandoned_batch_refuses_the_next(info, seed):
    """Issue 32 item 8: MORI's dispatch ADDS the rows it delivers to its received-row counter
    and only combine zeroes it (intranode.hpp ~227, 482 at 624002c8; the fake does so now), so
    after a batch left between dispatch and combine (the layer's ``abandon``, its experts
    raised) the next dispatch would read the old rows' count plus its own. The dispatcher
    refuses instead, naming the fix."""
    d = _mori(info)
    x, w, ids = _batch(info.rank, 9, seed, empty=0.0)
    first = d.dispatch(x, w, ids)
    R1 = first.num_received
    d.abandon(first.handle, "experts", RuntimeError("an expert raised"))
    try:
        d.dispatch(x, w, ids)
    except ValueError as exc:
        message = str(exc)
    else:
        raise AssertionError("a dispatch after an abandoned batch was accepted")
    assert d.op.calls == ["dispatch"], "refused before MORI ran"
    op = d.op  # what MORI itself does with a second dispatch: the counts add up
    op.dispatch(x, w, None, ids.int())
    assert int(op._outputs()[4][0]) == 2 * R1
    return message


def _check_sanity_suite_on_fakes(info, seed):
    """What `rocm-moe sanity --comm mori --experts aiter` checks on MI300, on the fakes."""
    from rocm_moe.sanity import run_sanity

    layer = EPMoE(hidden_size=H, intermediate_size=I, router=RouterConfig.qwen3_moe(E, K),
                  dispatcher=_mori(info, dtype=torch.bfloat16),
                  experts=_aiter(), dtype=torch.bfloat16)
    layer.reset_parameters(seed=3)
    rows = run_sanity(layer, seed=seed % 1000, expert_weights=lambda g: tuple(
        t.bfloat16() for t in syn.expert_weights(3, g, H, I)))
    failed = [r for r in rows if not r.passed]
    assert not failed, failed
    assert {r.check for r in rows} >= {"single_expert", "half_weight", "raw_unweighted",
                                       "topk_sum", "modes_agree", "comm_identity"}


def _check_dp_x_ep_groups_without_global_rank_0(info, seed):
    """Defect 3: EP groups {0, 1} and {2, 3} of a DP x EP layout; MORI's torch helper would
    broadcast the unique id from global rank 0, which group {2, 3} lacks."""
    import torch.distributed as dist

    if info.world_size < 4:
        return "needs 4 ranks"
    groups = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    mine = groups[info.rank // 2]
    mori = FakeMori(groups=groups)
    d = _mori(info, mori=mori, group=mine, world_size=2)
    _identity_round_trip(info, seed, d, batches=(9, 17))
    try:  # a second, different group in this process: refused before MORI runs
        _mori(info, mori=mori)
    except ValueError as exc:
        message = str(exc)
    else:
        raise AssertionError("a second shmem group was accepted")
    assert mori.built == 1
    assert mori.shmem.skipped == 0
    again = _mori(info, mori=mori, group=mine, world_size=2)  # same group: shared shmem
    _identity_round_trip(info, seed, again, batches=(5,))
    return message


def _check_ranks_disagreeing_refused_before_mori(info, seed):
    """Ranks with different kernel types would meet MORI's barriers with different ops."""
    mori = FakeMori()
    try:
        _mori(info, mori=mori, kernel_type="AsyncLL" if info.rank == 0 else "auto")
    except ValueError as exc:
        assert mori.built == 0
        return str(exc)
    raise AssertionError("disagreeing kernel types accepted")


def _check_heap_overflow_refused_before_mori(info, seed):
    """Defect 4: the second op would overflow the heap: refused with the size to set."""
    import os

    p = Placement.contiguous(E, info.world_size)
    need = heap_bytes(mori_config(p, info.rank, hidden_size=H, top_k=K, dtype=torch.float32,
                                  max_tokens_per_rank=CAP))
    os.environ["MORI_SHMEM_HEAP_SIZE"] = str(need * 3 // 2)
    try:
        mori = FakeMori()
        first = _mori(info, mori=mori)  # kept alive: its buffers stay allocated
        try:
            _mori(info, mori=mori)
        except ValueError as exc:
            message = str(exc)
        else:
            raise AssertionError("heap overflow accepted")
    finally:
        del os.environ["MORI_SHMEM_HEAP_SIZE"]
    assert mori.built == 1, "refused before MORI allocated"
    assert first.op.calls == []
    return message


def _check_padded_path_reads_nothing_on_the_host(info, seed):
    """Defect 8: capacity_sized keeps MORI's row count on the device (DispatchResult.num_valid,
    ids past it -1); forward_padded hands it to AITER as num_local_tokens. Nothing is read on
    the host: the fake's counter raises if it is. EPMoE runs on it unchanged (validate=False)."""
    g = torch.Generator().manual_seed(3)
    e = E // info.world_size
    w13 = (torch.randn(e, 2 * I, H, generator=g) / 3).bfloat16()
    w2 = (torch.randn(e, H, I, generator=g) / 3).bfloat16()
    strict = _mori(info, dtype=torch.bfloat16, mori=FakeMori(no_host_reads=True),
                   capacity_sized=True)
    plain = _mori(info, dtype=torch.bfloat16)
    for i, T in enumerate((17, 0 if info.rank else 5, 40)):
        x, w, ids = _batch(info.rank, T, seed + i)
        x = x.bfloat16()
        y = forward_padded(strict, _aiter(), x, w, ids, w13, w2)
        d = plain.dispatch(x, w, ids)
        ref = plain.combine(_aiter()(d.x, d.topk_ids, d.topk_weights, w13, w2,
                                     plain.expert_map, weight_mode="experts"), d.handle)
        torch.testing.assert_close(y, ref, rtol=0, atol=0)
    x = syn.tokens(seed, info.rank, 23, H).bfloat16()
    outs = []
    for disp in (strict, plain):
        layer = EPMoE(hidden_size=H, intermediate_size=I, router=RouterConfig.qwen3_moe(E, K),
                      dispatcher=disp, experts=_aiter(), dtype=torch.bfloat16, validate=False)
        layer.reset_parameters(seed=3)
        outs.append(layer(x))
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)
    default = _mori(info, dtype=torch.bfloat16, mori=FakeMori(no_host_reads=True))
    xb, wb, ib = _batch(info.rank, 3, seed)
    try:
        default.dispatch(xb.bfloat16(), wb, ib)
    except ContractError as exc:
        return str(exc)  # the default dispatch reads the count once: caught here
    raise AssertionError("host read not caught")


def _check_fake_lifecycle(info, seed):
    """The fake does what MORI does (not the adapter's rules): persistent output buffers,
    dtypes, hidden_dim as a maximum, combine weights, routing replay, AsyncLL's receives."""
    p = Placement.contiguous(E, info.world_size)
    cfg = mori_config(p, info.rank, hidden_size=H, top_k=K, dtype=torch.float32,
                      max_tokens_per_rank=CAP)
    op = fake_mori_op(cfg)
    out = {}
    x1, w1, i1 = _batch(info.rank, 9, seed)
    first = op.dispatch(x1, w1, None, i1.int())
    R1 = int(first[4][0])
    rows1 = first[0][:R1].clone()
    op.combine(first[0], None, i1.int())
    x2, w2, i2 = _batch(info.rank, 9, seed + 1)
    second = op.dispatch(x2 + 100, w2, None, i2.int())
    out["buffers_persist"] = second[0].data_ptr() == first[0].data_ptr() and \
        (R1 == 0 or not torch.equal(first[0][:R1], rows1))
    _, comb_w = op.combine(second[0], second[1], i2.int())  # weights back: w * U
    U = torch.tensor([p.owner(r[r >= 0]).unique().numel() for r in i2]).float()
    out["weights_w_times_U"] = torch.allclose(comb_w[:9], w2 * U[:, None])
    out["counter_zeroed_by_combine"] = int(second[4][0]) == 0
    fnuz = torch.float8_e4m3fnuz  # the fake's default build is gfx942's: fp8_fnuz only
    for dtype, ok in ((torch.bfloat16, True), (fnuz, True), (torch.float16, False)):
        try:
            op.dispatch(torch.zeros(2, H - 2, dtype=dtype), w1[:2], None, i1[:2].int())
            op.combine(torch.zeros(CAP * info.world_size, H - 2).to(
                torch.bfloat16 if dtype == fnuz else dtype), None, i1[:2].int())
            out[str(dtype)] = ok
        except KeyError:
            out[str(dtype)] = not ok
    try:  # the other FP8 encoding has no kernel in a gfx942 build
        op.dispatch(torch.zeros(2, H - 2, dtype=torch.float8_e4m3fn), w1[:2], None, i1[:2].int())
        out["ocp_refused_on_gfx942"] = False
    except RuntimeError as exc:
        out["ocp_refused_on_gfx942"] = "fp8_ocp" in str(exc)
    try:
        op.dispatch(torch.zeros(2, H + 1), w1[:2], None, i1[:2].int())
        out["hidden_dim_is_a_maximum"] = False
    except ContractError:
        out["hidden_dim_is_a_maximum"] = True
    *_, routing = op.dispatch(x1, w1, None, i1.int(), return_routing=True)
    back, _ = op.combine(op._outputs()[0], None, i1.int(), routing=routing)
    U1 = torch.tensor([p.owner(r[r >= 0]).unique().numel() for r in i1]).float()
    out["routing_replay"] = torch.equal(back[:9], x1 * U1[:, None])
    wrong = torch.full_like(i1, -1).int()  # right row count, wrong values: expert 0 only
    wrong[:, 0] = 0
    sums = {}
    for kt, extra in (("IntraNode", {}), ("InterNodeV1", dict(gpu_per_node=1, block_num=96,
                                                              rdma_block_num=64))):
        o = fake_mori_op({**cfg, "kernel_type": kt, **extra})
        res = o.dispatch(x1, w1, None, i1.int())
        sums[kt] = o.combine(res[0], None, wrong)[0][:9].clone()
    right = x1 * U1[:, None]
    out["intranode_ignores_combine_id_values"] = torch.equal(sums["IntraNode"], right)
    out["internode_v1_reads_them"] = bool((U1 == 1).all()) or \
        not torch.equal(sums["InterNodeV1"].nan_to_num(), right)
    a = fake_mori_op({**cfg, "kernel_type": "AsyncLL"})
    res = a.dispatch(x1, w1, None, i1.int())
    out["async_ll_nothing_before_recv"] = int(res[4][0]) == 0
    a.dispatch_recv()
    out["async_ll_rows_after_recv"] = int(res[4][0]) == R1
    assert all(out.values()), out
    return out


def _check_max_total_recv_tokens(info, seed):
    """Issue 32 item 9: smaller receive buffers (MORI's max_total_recv_tokens): batches that
    fit round-trip as MORI's test wants; one that would overflow a rank's buffers (every token
    to rank 0's experts) is refused on every rank before MORI runs (its IntraNode dispatch has
    no bound check, intranode.hpp ~148)."""
    W = info.world_size
    d = _mori(info, max_total_recv_tokens=(W - 1) * CAP)  # buffers of (W - 1) x CAP rows
    full = _mori(info)
    assert d.op._x.numel() * W == full.op._x.numel() * (W - 1)
    _identity_round_trip(info, seed, d, batches=(9, 1, 12))  # at most W x 12 rows a rank
    x, w, ids = _batch(info.rank, CAP, seed, empty=0.0)
    for row in ids:  # every token reaches rank 0 (expert 0 first, K still distinct)
        j = int((row == 0).nonzero()[0, 0]) if bool((row == 0).any()) else 0
        row[j], row[0] = row[0].clone(), 0
    calls = list(d.op.calls)
    try:
        d.dispatch(x, w, ids)
    except ValueError as exc:
        message = str(exc)
    else:
        raise AssertionError("an overflowing batch was accepted")
    assert d.op.calls == calls, "refused before MORI ran"
    x, w, ids = _batch(info.rank, 5, seed + 7)  # and the next batch runs
    res = d.dispatch(x, w, ids)
    U = torch.tensor([d.placement.owner(r[r >= 0]).unique().numel() for r in ids])
    y = d.combine(ExpertsOutput(out=res.x.clone(), weights_applied=True), res.handle)
    assert torch.equal(y, x * U[:, None].float())
    return message


def _check_fake_follows_upstream_details(info, seed):
    """Issue 32 item 8, what MORI does (624002c8): empty [T, 0] scales with scale_dim 0 are
    accepted and dropped (DC dispatch: has_scales needs scale_dim > 0); weights=None is
    accepted where the kernels check the pointer (IntraNode) and a null read on InterNodeV1
    (internode_v1.cpp ~685); FP8 rows combine in FP8 (sums in FP8); FP4 (float4_e2m1fn_x2,
    DC _DTYPE_SUFFIX) has kernels on gfx950 builds only."""
    p = Placement.contiguous(E, info.world_size)
    cfg = mori_config(p, info.rank, hidden_size=H, top_k=K, dtype=torch.float32,
                      max_tokens_per_rank=CAP)
    x, w, ids = _batch(info.rank, 9, seed, empty=0.0)
    U = torch.tensor([p.owner(r[r >= 0]).unique().numel() for r in ids]).float()
    op = fake_mori_op(cfg)
    out = op.dispatch(x, None, torch.empty(9, 0), ids.int())
    R = int(out[4][0])
    assert out[2] is None, "empty scales: none back"
    back, _ = op.combine(out[0], None, ids.int())
    assert torch.equal(back[:9], x * U[:, None])
    fnuz = torch.float8_e4m3fnuz
    q = (x / 4).to(fnuz)
    out = op.dispatch(q, w, None, ids.int())
    assert int(out[4][0]) == R
    back, _ = op.combine(out[0][:R].clone(), None, ids.int())
    assert back.dtype == fnuz  # the same FP8 both ways: MORI sums and writes FP8
    torch.testing.assert_close(back[:9].float(), (q.float() * U[:, None]).to(fnuz).float(),
                               rtol=0.13, atol=0)
    v1 = fake_mori_op({**cfg, "kernel_type": "InterNodeV1", "gpu_per_node": 1, "block_num": 96,
                       "rdma_block_num": 64})
    try:
        v1.dispatch(x, None, None, ids.int())
        raise AssertionError("InterNodeV1 took weights=None")
    except ContractError:
        pass
    fp4 = torch.randint(0, 255, (9, H // 2), dtype=torch.uint8).view(torch.float4_e2m1fn_x2)
    found = {}
    for arch in ("gfx942", "gfx950"):
        o = fake_mori_op(cfg, arch=arch)
        try:
            res = o.dispatch(fp4, w, None, ids.int())
            mine = [t for s, t in o._rows if s == info.rank]
            found[arch] = all(torch.equal(res[0][r].view(torch.uint8), fp4[t].view(torch.uint8))
                              for r, (s, t) in enumerate(o._rows) if s == info.rank) and \
                len(mine) == sum(1 for r in ids if (p.owner(r[r >= 0]) == info.rank).any())
        except RuntimeError as exc:
            found[arch] = "fp4" in str(exc) and "error"
    assert found == {"gfx942": "error", "gfx950": True}, found
    return found


CHECKS = collect_checks(globals(), skip=())


def _suite(info, seed):
    return run_checks(CHECKS, info, seed)


@pytest.fixture(scope="module", params=[2, 4], ids=lambda w: f"gloo-W{w}")
def suite(request):
    seed = int(torch.randint(0, 2**31 - 1, (1,)))
    return seed, launch(request.param, _suite, seed, backend="gloo", timeout_s=180)


@pytest.mark.parametrize("check", list(CHECKS))
def test_mori_adapter(suite, check):
    seed, results = suite
    for rank, res in enumerate(results):
        assert res[check]["ok"], f"rank={rank} seed={seed}\n{res[check]['value']}"


def test_fake_messages(suite):
    _, results = suite
    for res in results:
        assert "mori#475" in res["fake_catches_dispatched_ids"]["value"]
        assert "int32" in res["fake_catches_int64_ids"]["value"]
        assert "row-major" in res["internode_v1_non_contiguous_ids"]["value"]
        guards = res["adapter_guards"]["value"]
        assert "mori#356" in guards["capacity"]
        assert "dispatched but not combined" in guards["two_in_flight"]
        assert "wrong rows" in guards["stale_handle"]
        dp_ep = res["dp_x_ep_groups_without_global_rank_0"]["value"]
        assert dp_ep == "needs 4 ranks" or "once per" in dp_ep
        assert "MORI_SHMEM_HEAP_SIZE=1G" in res["heap_overflow_refused_before_mori"]["value"]
        assert "host read" in res["padded_path_reads_nothing_on_the_host"]["value"]
        assert "kernel_type by rank" in res["ranks_disagreeing_refused_before_mori"]["value"]
        assert "combine zeroes" in res["abandoned_batch_refuses_the_next"]["value"]
        assert "no bound check" in res["max_total_recv_tokens"]["value"]


@pytest.mark.gpu
def test_real_mori_is_importable_on_rocm():
    pytest.importorskip("mori")
    if torch.version.hip is None:
        pytest.skip("needs ROCm")
    from rocm_moe.comm.mori import build_mori_op  # noqa: F401  (run: rocm-moe sanity --comm mori)
