"""EPLB (issue 29) on one process: the replica placement's tables and checks, the device
replica choice, the load counters, the move plan, the layer's switch and its refusals, a
rebalance at W = 1 (float and FP8 layers), and on a GPU a captured graph across a rebalance.
The multi-rank cases (W = 2, 3, 4 on gloo) are in tests/test_eplb_dist.py."""

from __future__ import annotations

import pytest
import torch

from rocm_moe import EPMoE, Placement, RouterConfig, dense_moe_reference
from rocm_moe import synthetic as syn
from rocm_moe.comm.local import LocalDispatcher
from rocm_moe.eplb import ExpertLoad, Transfer, plan_move
from rocm_moe.placement import ExpertMap, ExpertMask
from rocm_moe.replicas import ReplicaChoice, ReplicatedPlacement
from tests.conftest import TOL, rel_err

E, K, H, I, SEED = 8, 3, 16, 8, 5
ROUTER = RouterConfig.qwen3_moe(E, K)


def _layer(R: int | None = 4, **kw) -> EPMoE:
    layer = EPMoE(hidden_size=H, intermediate_size=I, router=ROUTER, num_redundant_experts=R,
                  **kw)
    layer.reset_parameters(seed=SEED)
    return layer


def _oracle(layer: EPMoE, x: torch.Tensor, forced=None) -> torch.Tensor:
    r = layer.route_tokens(x, forced_expert_ids=forced)
    return dense_moe_reference(x.double(), r.topk_weights, r.topk_ids,
                               expert_weights=lambda g: syn.expert_weights(SEED, g, H, I))[0]


# ---- the placement ------------------------------------------------------------------------------
def test_worked_example_of_the_module_docstring():
    p = ReplicatedPlacement(torch.tensor([0, 1, 2, 0]), 2)
    assert p.num_experts == 3
    assert p.num_physical == 4
    assert p.num_redundant == 1
    assert p.log_to_phys.tolist() == [[0, 3], [1, -1], [2, -1]]
    assert p.replica_count.tolist() == [2, 1, 1]
    ids = torch.tensor([[0, 1]], dtype=torch.int32)
    assert ReplicaChoice(p, 1, "cpu").to_physical(ids).tolist() == [[3, 1]]
    assert ReplicaChoice(p, 0, "cpu").to_physical(ids).tolist() == [[0, 1]]
    assert p.logical_experts(1) == (2, 0)
    assert p.physical == Placement.contiguous(4, 2)
    assert isinstance(p.expert_map(1), ExpertMap)
    assert p.expert_map(1).map_E.tolist() == [-1, -1, 0, 1]
    assert isinstance(p.expert_mask(0, sentinel=True), ExpertMask)
    assert ReplicatedPlacement.initial(4, 2, 2).phys_to_log.tolist() == [0, 1, 2, 2, 3, 0]
    assert ReplicatedPlacement.initial(3, 1, 2).phys_to_log.tolist() == [0, 1, 2, 0]


def test_placement_is_immutable_and_copies_its_table():
    t = torch.tensor([0, 1, 2, 0])
    p = ReplicatedPlacement(t, 2)
    t[0] = 2  # the caller's tensor changes; the placement does not
    assert p.phys_to_log.tolist() == [0, 1, 2, 0]
    with pytest.raises(AttributeError):
        p.world_size = 4
    assert p == ReplicatedPlacement(torch.tensor([0, 1, 2, 0], dtype=torch.int32), 2)
    assert p != ReplicatedPlacement(torch.tensor([0, 1, 2, 1]), 2, 3)


@pytest.mark.parametrize(("table", "W", "kw", "exc", "match"), [
    (torch.tensor([0.0, 1.0]), 1, {}, TypeError, "integer tensor"),
    (torch.tensor([True, False]), 1, {}, TypeError, "integer tensor"),
    ([0, 1], 1, {}, TypeError, "1-D integer tensor"),
    (torch.tensor([[0, 1]]), 1, {}, TypeError, "1-D integer tensor"),
    (torch.tensor([0, 1, 2]), 2, {}, ValueError, "multiple of world_size=2"),
    (torch.tensor([], dtype=torch.int64), 1, {}, ValueError, "positive multiple"),
    (torch.tensor([0, 2, 2, 0]), 2, {}, ValueError, r"logical expert\(s\) \[1\] have no"),
    (torch.tensor([0, 1, 2, 1]), 2, dict(num_experts=4), ValueError, r"\[3\] have no replica"),
    (torch.tensor([0, 1, -1, 1]), 2, {}, ValueError, r"logical ids in \[0, E"),
    (torch.tensor([0, 1, 5, 1]), 2, dict(num_experts=3), ValueError, r"in \[0, E=3\)"),
    (torch.tensor([0, 1]), 0, {}, ValueError, "world_size"),
    (torch.tensor([0, 1]), 2.0, {}, TypeError, "world_size"),
])
def test_bad_tables_are_refused(table, W, kw, exc, match):
    with pytest.raises(exc, match=match) as err:
        ReplicatedPlacement(table, W, **kw)
    assert "Fix:" in str(err.value)


def test_initial_refuses_a_size_the_ranks_cannot_share():
    with pytest.raises(ValueError, match=r"E \+ R = 9 must be divisible.*Fix: use R = 0 \+ a mul"):
        ReplicatedPlacement.initial(8, 1, 2)
    with pytest.raises(ValueError, match="num_redundant_experts"):
        ReplicatedPlacement.initial(8, -2, 2)


@pytest.mark.parametrize(("E_", "R", "W"), [(128, 32, 4), (8, 4, 2), (16, 8, 8), (12, 0, 3)])
def test_initial_placement_gives_every_rank_the_same_uniform_work(E_, R, W):
    p = ReplicatedPlacement.initial(E_, R, W)
    share_P = 1.0 / p.replica_count[p.phys_to_log].double()  # each replica's share of 1
    per_rank = p.rank_load(share_P)
    assert torch.allclose(per_rank, torch.full((W,), E_ / W, dtype=torch.float64))
    assert p.replica_count.max() <= 2


def test_log_to_phys_inverts_phys_to_log():
    g = torch.Generator().manual_seed(3)
    for _ in range(20):
        E_, W = int(torch.randint(1, 9, (1,), generator=g)), int(torch.randint(1, 4, (1,),
                                                                                 generator=g))
        P = E_ + int(torch.randint(0, 9, (1,), generator=g))
        P += -P % W
        table = torch.cat([torch.randperm(E_, generator=g),
                           torch.randint(0, E_, (P - E_,), generator=g)])[torch.randperm(
                               P, generator=g)]
        p = ReplicatedPlacement(table, W, E_)
        lp = p.log_to_phys
        assert lp.shape == (E_, int(p.replica_count.max()))
        for e in range(E_):
            row = lp[e][lp[e] >= 0]
            assert row.tolist() == (table == e).nonzero().flatten().tolist()
            assert int(p.replica_count[e]) == row.numel()


def test_spread_choice_uses_every_replica_evenly():
    table = torch.tensor([0, 2, 3, 0, 4, 5, 0, 6, 7, 1, 1, 8])  # 0 on ranks 0-2, 1 twice on 3
    p = ReplicatedPlacement(table, 4)
    ids = torch.tensor([[0, 1]] * 12)
    for rank in range(4):
        phys = ReplicaChoice(p, rank, "cpu").to_physical(ids)
        assert phys[:, 0].bincount(minlength=12)[[0, 3, 6]].tolist() == [4, 4, 4]
        assert phys[:, 1].bincount(minlength=12)[9:11].tolist() == [6, 6]
    with pytest.raises(ValueError, match="replica_choice"):
        ReplicaChoice(p, 0, "cpu", choice="nearest")
    with pytest.raises(ValueError, match="only applies to replica_choice='local'"):
        ReplicaChoice(p, 0, "cpu", nodes=(0, 0, 1, 1))


def test_replica_choice_prefers_the_own_rank_and_spreads_the_rest():
    # logical 0 on ranks 0, 1, 2 (physical 0, 3, 6); logical 1 on rank 3 only (9), twice (10)
    table = torch.tensor([0, 2, 3, 0, 4, 5, 0, 6, 7, 1, 1, 8])
    p = ReplicatedPlacement(table, 4)
    T = 12
    ids = torch.tensor([[0, 1]] * T, dtype=torch.int64)
    for rank, local0 in ((0, {0}), (1, {3}), (2, {6})):
        phys = ReplicaChoice(p, rank, "cpu", choice="local").to_physical(ids)
        assert set(phys[:, 0].tolist()) == local0  # its own replica of logical 0
        assert phys[:, 1].bincount(minlength=12)[9:11].tolist() == [6, 6]  # spread evenly
        assert phys.dtype == ids.dtype
    phys = ReplicaChoice(p, 3, "cpu", choice="local").to_physical(ids)
    assert phys[:, 0].bincount(minlength=12)[[0, 3, 6]].tolist() == [4, 4, 4]
    assert set(phys[:, 1].tolist()) == {9, 10}  # rank 3 holds both replicas of logical 1
    empty = ReplicaChoice(p, 0, "cpu", choice="local").to_physical(
        torch.tensor([[-1, 0]], dtype=torch.int32))
    assert empty.tolist() == [[-1, 0]]


def test_replica_choice_prefers_the_own_node_next():
    # logical 0 on ranks 0 and 2 (physical 0, 4); nodes [0, 0, 1, 1]
    p = ReplicatedPlacement(torch.tensor([0, 1, 2, 3, 0, 4, 5, 6]), 4)
    ids = torch.zeros(8, 1, dtype=torch.int64)
    for rank, want in ((1, {0}), (3, {4})):
        near = ReplicaChoice(p, rank, "cpu", choice="local", nodes=(0, 0, 1, 1)).to_physical(ids)
        assert set(near.flatten().tolist()) == want  # the replica on its own node
        spread = ReplicaChoice(p, rank, "cpu", choice="local").to_physical(ids)
        assert set(spread.flatten().tolist()) == {0, 4}  # no nodes: both replicas
    # a node without a replica spreads over all of them
    far = ReplicaChoice(p, 1, "cpu", choice="local", nodes=(0, 1, 2, 2)).to_physical(ids)
    assert set(far.flatten().tolist()) == {0, 4}
    layer = _layer(R=4, replica_choice="local", replica_nodes=(0,))
    assert layer(syn.tokens(SEED, 0, 3, H)).shape == (3, H)


@pytest.mark.parametrize(("nodes", "exc", "match"), [
    ((0, 1), ValueError, "must hold W=1 node"), ((-1,), ValueError, "indices >= 0"),
    ("0", TypeError, "sequence of ints"), ((0.0,), TypeError, "sequence of ints")])
def test_bad_replica_nodes(nodes, exc, match):
    with pytest.raises(exc, match=match):
        _layer(R=4, replica_choice="local", replica_nodes=nodes)
    with pytest.raises(ValueError, match="only mean something with EPLB"):
        _layer(R=None, replica_nodes=(0,))
    with pytest.raises(ValueError, match="only mean something with EPLB"):
        _layer(R=None, replica_choice="local")
    with pytest.raises(ValueError, match="only applies to replica_choice='local'"):
        _layer(R=4, replica_nodes=(0,))
    with pytest.raises(ValueError, match=r"replica_choice='nearest'.*must be one of"):
        _layer(R=4, replica_choice="nearest")


def test_choice_tables_keep_their_shape_across_placements():
    a = ReplicatedPlacement.initial(4, 2, 2)
    b = ReplicatedPlacement(torch.tensor([0, 0, 0, 1, 2, 3]), 2)  # 3 replicas of logical 0
    c = ReplicaChoice(a, 1, "cpu")
    cand = c.cand_EC
    c.update(b)
    assert c.cand_EC is cand
    assert cand.shape == (4, 3)
    ids = torch.zeros(6, 1, dtype=torch.int64)
    assert sorted(set(c.to_physical(ids).flatten().tolist())) == [0, 1, 2]
    with pytest.raises(ValueError, match="max_replicas"):
        b.choice_tables(0, max_replicas=2)


# ---- load counters ----------------------------------------------------------------------------
def test_load_ring_counts_slots_and_forgets_old_steps():
    load = ExpertLoad(4, 6, window=2, device="cpu")
    p = ReplicatedPlacement.initial(4, 2, 2)
    steps = [torch.tensor([[0, 1], [0, -1]]), torch.tensor([[3, 2]]), torch.tensor([[1, 0]])]
    for ids in steps:
        load.record(ids, ids + 2 * (ids >= 0))  # physical = logical + 2 (a made-up map)
    rep = load.report(p)
    assert rep.steps == 2
    assert rep.scope == "rank"
    assert rep.logical.tolist() == [1, 1, 1, 1]  # the first step fell out of the window
    assert rep.physical.tolist() == [0, 0, 1, 1, 1, 1]
    assert rep.per_rank.tolist() == [1, 3]
    assert rep.imbalance == pytest.approx(1.5)
    load.restart_physical()
    assert load.report(p).physical.sum() == 0
    assert load.report(p).logical.sum() == 4


def test_layer_counts_every_token_slot_per_expert():
    layer = _layer(R=4, load_window=3)
    x = syn.tokens(SEED, 0, 33, H)
    forced = torch.tensor([[0, 1, 2]] * 33)
    layer(x, forced_expert_ids=forced)
    rep = layer.expert_load(scope="rank")
    assert rep.logical.tolist() == [33, 33, 33, 0, 0, 0, 0, 0]
    # logical 0, 1, 2 have two replicas each (initial at W = 1: p mod 8); slot k of token t
    # takes replica (t + k) mod 2: 17 / 16, 16 / 17, 17 / 16
    assert rep.physical.tolist() == [17, 16, 17, 0, 0, 0, 0, 0, 16, 17, 16, 0]
    assert rep.per_rank.tolist() == [99]
    y = layer(x)
    ids = layer.route_tokens(x).topk_ids
    rep = layer.expert_load(scope="group")  # one rank: the group is this rank
    assert rep.steps == 2
    assert rep.scope == "group"
    want = torch.bincount(ids.flatten().long(), minlength=E) + torch.tensor([33] * 3 + [0] * 5)
    assert rep.logical.tolist() == want.tolist()
    assert y.shape == x.shape


# ---- the move plan ----------------------------------------------------------------------------
def test_plan_move_worked_example():
    old = ReplicatedPlacement(torch.tensor([0, 1, 2, 0]), 2)
    new = ReplicatedPlacement(torch.tensor([0, 2, 1, 0]), 2)
    assert plan_move(old, new) == (Transfer(logical=2, src_rank=1, src_slot=0, dst_rank=0,
                                            dst_slot=1),
                                   Transfer(logical=1, src_rank=0, src_slot=1, dst_rank=1,
                                            dst_slot=0))
    assert plan_move(old, old) == ()
    # a slot whose expert the same rank already held is a local copy
    local = plan_move(old, ReplicatedPlacement(torch.tensor([0, 0, 2, 1]), 2))
    assert local[0] == Transfer(logical=0, src_rank=0, src_slot=0, dst_rank=0, dst_slot=1)
    with pytest.raises(ValueError, match=r"must keep the layer's \(E, P, W\)"):
        plan_move(old, ReplicatedPlacement(torch.tensor([0, 1, 2, 0, 1, 2]), 2))


def test_plan_move_takes_replicas_in_turn():
    old = ReplicatedPlacement(torch.tensor([0, 1, 0, 2]), 2)  # logical 0 on both ranks
    new = ReplicatedPlacement(torch.tensor([1, 2, 0, 0, 0, 0, 1, 2]), 4)
    old4 = ReplicatedPlacement(torch.tensor([0, 1, 2, 0, 1, 2, 0, 1]), 4)
    plan = plan_move(old4, new)
    assert all(t.src_rank != t.dst_rank or t.src_slot != t.dst_slot for t in plan)
    srcs = [t.src_rank for t in plan if t.logical == 0 and t.src_rank != t.dst_rank]
    assert len(set(srcs)) == len(srcs)  # each remote copy of logical 0 from another holder
    assert old.replica_count.tolist() == [2, 1, 1]


# ---- the layer --------------------------------------------------------------------------------
@pytest.mark.parametrize("R", [0, 1, 4])
@pytest.mark.parametrize("mode", ["experts", "combine"])
def test_layer_with_replicas_matches_oracle_and_plain_layer(R, mode):
    plain = EPMoE(hidden_size=H, intermediate_size=I, router=ROUTER, weight_mode=mode)
    plain.reset_parameters(seed=SEED)
    layer = _layer(R=R, weight_mode=mode)
    assert layer.w13.shape[0] == E + R
    assert layer.dispatcher.placement.num_experts == E + R
    for T in (1, 33):
        x = syn.tokens(SEED, 1, T, H) * 3
        for forced in (None, torch.tensor([[0, 1, 2]] * T), torch.tensor([[5, 4, 0]] * T)):
            y = layer(x, forced_expert_ids=forced)
            assert rel_err(y, _oracle(plain, x, forced)) < TOL[torch.float32]
            assert rel_err(y, plain(x, forced_expert_ids=forced)) < TOL[torch.float32]


def test_return_raw_reports_logical_ids():
    layer = _layer(R=4)
    x = syn.tokens(SEED, 0, 9, H)
    forced = torch.tensor([[0, 7, 1]] * 9)
    out = layer(x, forced_expert_ids=forced, return_raw=True)
    assert out.topk_ids.tolist() == forced.tolist()  # not the replicas' physical ids


def test_rebalance_on_one_rank_keeps_outputs_and_moves_weights():
    layer = _layer(R=4)
    inv = _layer(R=4, invariant=True)
    plain_inv = EPMoE(hidden_size=H, intermediate_size=I, router=ROUTER, invariant=True)
    plain_inv.reset_parameters(seed=SEED)
    x = syn.tokens(SEED, 0, 33, H) * 3
    y0, yi0 = layer(x), inv(x)
    assert torch.equal(yi0, plain_inv(x))  # invariant: the bits of the plain layer
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        table = torch.cat([torch.arange(E), torch.randint(0, E, (4,), generator=g)])
        table = table[torch.randperm(E + 4, generator=g)]
        res = layer.rebalance(table)
        inv.rebalance(table)
        assert layer.replicas.phys_to_log.tolist() == table.tolist() == list(layer.local_experts)
        assert res.moved == 0
        assert res.received_bytes == 0
        for j, gid in enumerate(layer.local_experts):
            w13, w2 = syn.expert_weights(SEED, gid, H, I)
            assert torch.equal(layer.w13[j], w13.float())
            assert torch.equal(layer.w2[j], w2.float())
        assert rel_err(layer(x), y0) < TOL[torch.float32]
        assert torch.equal(inv(x), yi0)
    assert layer.expert_load(scope="rank").physical.sum() == 33 * K  # restarted at the move


def test_rebalance_refusals_leave_the_placement():
    layer = _layer(R=4)
    before = layer.replicas
    bad = [(torch.arange(16) % 8, ValueError, "must keep the layer's"),
           (torch.arange(12) % 7, ValueError, r"\[7\] have no replica"),
           (torch.arange(12).float(), TypeError, "integer tensor"),
           ("0,1", TypeError, "integer tensor")]
    for table, exc, match in bad:
        with pytest.raises(exc, match=match):
            layer.rebalance(table)
        assert layer.replicas is before
    with pytest.raises(ValueError, match="experts_per_round"):
        layer.rebalance(torch.arange(12) % 8, experts_per_round=0)
    plain = EPMoE(hidden_size=H, intermediate_size=I, router=ROUTER)
    for call in (lambda: plain.rebalance(torch.arange(8)), lambda: plain.expert_load()):
        with pytest.raises(ValueError, match=r"without EPLB.*num_redundant_experts=R"):
            call()
    with pytest.raises(ValueError, match="scope"):
        layer.expert_load(scope="world")


@pytest.mark.parametrize(("kw", "exc", "match"), [
    (dict(num_redundant_experts=-1), ValueError, "num_redundant_experts"),
    (dict(num_redundant_experts=1.0), TypeError, "num_redundant_experts"),
    (dict(num_redundant_experts=2, load_window=0), ValueError, "load_window"),
    (dict(replica_placement=torch.arange(8)), TypeError, "ReplicatedPlacement"),
    (dict(replica_placement=ReplicatedPlacement.initial(6, 2, 1)), ValueError,
     r"router's E=8"),
    (dict(replica_placement=ReplicatedPlacement.initial(8, 2, 1), num_redundant_experts=4),
     ValueError, "must equal replica_placement's R"),
    (dict(num_redundant_experts=2, dispatcher=LocalDispatcher(Placement.contiguous(8, 1))),
     ValueError, r"Placement.contiguous\(10, 1\)"),
])
def test_bad_eplb_construction(kw, exc, match):
    with pytest.raises(exc, match=match) as err:
        EPMoE(hidden_size=H, intermediate_size=I, router=ROUTER, **kw)
    assert "Fix:" in str(err.value)


def test_forward_routed_takes_logical_ids_only():
    layer = _layer(R=4)
    x = syn.tokens(SEED, 0, 3, H)
    w = torch.full((3, K), 1 / K)
    with pytest.raises(ValueError, match=r"topk_ids.*\[0, 8\)"):
        layer.forward_routed(x, w, torch.tensor([[0, 1, 9]] * 3))  # a physical id: refused
    with pytest.raises(ValueError, match=r"topk_ids\.shape"):
        layer.forward_routed(x, w, torch.tensor([0, 1, 2]))
    ids = torch.tensor([[0, 1, 7], [0, -1, 1], [-1, -1, -1]])  # -1: empty slots
    y = layer.forward_routed(x, w, ids)
    ref = dense_moe_reference(x.double(), w, ids,
                              expert_weights=lambda g: syn.expert_weights(SEED, g, H, I))[0]
    assert rel_err(y, ref) < TOL[torch.float32]
    assert torch.equal(y[2], torch.zeros(H))


def test_fp8_layer_rebalances_its_fp8_weights_and_scales():
    from rocm_moe.layer_fp8 import FP8EPMoE

    layer = FP8EPMoE(hidden_size=128, intermediate_size=128, router=ROUTER,
                     num_redundant_experts=4)
    plain = FP8EPMoE(hidden_size=128, intermediate_size=128, router=ROUTER)
    x = syn.tokens(0, 0, 9, 128)
    y0 = plain(x)
    # the same FP8 bytes in every replica; the experts' sums may run in another order
    assert rel_err(layer(x), y0) < TOL[torch.float32]
    table = torch.tensor([7, 6, 5, 4, 3, 2, 1, 0, 0, 0, 1, 1])
    layer.rebalance(table)
    for j, g in enumerate(table.tolist()):
        assert torch.equal(layer.w13_fp8[j].view(torch.uint8), plain.w13_fp8[g].view(torch.uint8))
        assert torch.equal(layer.w2_scale_inv[j], plain.w2_scale_inv[g])
    assert rel_err(layer(x), y0) < TOL[torch.float32]


def _graph_worker(info) -> dict:
    """bench layer's GPU path: symm dispatch, Triton experts, bf16, a CUDA graph captured
    before a rebalance and replayed after it."""
    from rocm_moe.comm.symm import SymmDispatcher
    from rocm_moe.experts.triton import TritonExperts
    from rocm_moe.graphs import GraphedEPMoE

    W, R, T = info.world_size, 4, 16
    disp = SymmDispatcher(Placement.contiguous(E + R, W), hidden_size=H, top_k=K,
                          dtype=torch.bfloat16, max_tokens_per_rank=T)
    layer = EPMoE(hidden_size=H, intermediate_size=I, router=ROUTER, dispatcher=disp,
                  experts=TritonExperts(), dtype=torch.bfloat16, device=info.device,
                  validate=False, num_redundant_experts=R)
    layer.reset_parameters(seed=SEED)
    x = (syn.tokens(SEED, info.rank, T, H) * 3).bfloat16().to(info.device)
    graphed = GraphedEPMoE(layer, buckets=(T,))
    y0 = graphed(x).clone()
    out = dict(before=bool(torch.equal(y0, layer(x))))
    table = layer.replicas.phys_to_log.flip(0)
    layer.rebalance(table)
    steps = layer.expert_load(scope="rank").steps
    y1 = graphed(x).clone()
    out.update(after=bool(torch.equal(y1, layer(x))), err=rel_err(y1, y0),
               counted=layer.expert_load(scope="rank").steps - steps,
               same_table=layer.replicas.phys_to_log.tolist() == table.tolist())
    return out


@pytest.mark.parametrize("W", [
    pytest.param(W, marks=pytest.mark.skipif(torch.cuda.device_count() < W,
                                              reason=f"needs {W} GPU(s)")) for W in (1, 2)])
def test_captured_graph_follows_a_rebalance(W):
    from rocm_moe.distributed import launch

    for rank, r in enumerate(launch(W, _graph_worker, backend="nccl", timeout_s=120)):
        assert r["before"], rank  # replay == eager, bit for bit
        assert r["after"], rank  # the tables and weights changed in place under the graph
        assert r["same_table"], rank
        assert r["err"] < TOL[torch.bfloat16], (rank, r)
        assert r["counted"] == 2, (rank, r)  # the replay and the eager forward were counted
