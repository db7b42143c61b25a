"""The one-launch Triton router (rocm_moe._routing_triton) against the torch router, bit for bit.

Everywhere (Triton's interpreter on CPUs, float16/float32 there): the kernel equals
``_emulated``, a torch re-statement of the torch router's CUDA arithmetic in its order
(PyTorch's warp softmax, its CUDA sum of the K weights, ties to the lower id), computed with
the same ``exp`` as the kernel (numpy's under the interpreter, the GPU's ``expf`` on GPUs).
On GPUs (``-m gpu``): the compiled kernel equals the torch path itself (``_route_torch``, what
``route`` ran before) bit for bit in bfloat16, float16 and float32, ``_emulated`` equals it too
(so the CPU comparison checks the right order), ties go to the lower id, and ``route`` is
capturable in a CUDA graph with the kernel in it.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from rocm_moe import RouterConfig, route
from rocm_moe._libs import triton_runs_on
from rocm_moe.routing import _choose, _finish_weights, _route_torch, _scores
from tests.conftest import DEVICE

pytestmark = pytest.mark.skipif(not triton_runs_on(DEVICE), reason="triton cannot run here")

GPU = DEVICE.type == "cuda"
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if GPU else [])
SIZES = [1, 33, 511]

# Every family's router, and the awkward corners of the kernel: E not a power of two, K not a
# power of two (the weights' sum tree), groups of a non-power-of-two size, a padded group count.
CASES = {
    "mixtral_E8_K2": RouterConfig.mixtral(8, 2),
    "softmax_E16_K1": RouterConfig.qwen3_moe(16, 1),
    "softmax_E60_K4": RouterConfig.qwen3_moe(60, 4),
    "softmax_E64_K6_nonorm": RouterConfig.qwen3_moe(64, 6, norm_topk_prob=False),
    "qwen3_E128_K8": RouterConfig.qwen3_moe(128, 8),
    "softmax_E256_K3": RouterConfig.qwen3_moe(256, 3),
    "dsv3_E256_K8_G8_TG4": RouterConfig.deepseek_v3(256, 8),
    "sigmoid_E160_K8_G8_TG4": RouterConfig.deepseek_v3(160, 8),
    "sigmoid_E96_K5_G3_TG2_nonorm": RouterConfig.deepseek_v3(96, 5, n_group=3, topk_group=2,
                                                             norm_topk_prob=False),
    "sigmoid_E32_K7_G4_TG4": RouterConfig.deepseek_v3(32, 7, n_group=4, topk_group=4,
                                                      routed_scaling_factor=1.0),
    "sigmoid_E16_K4_ungrouped": RouterConfig.deepseek_v3(16, 4, n_group=1, topk_group=1,
                                                         routed_scaling_factor=2.827),
}


def _warp() -> int:
    from rocm_moe._routing_triton import _warp_width

    return _warp_width(DEVICE)


def _exp(t: torch.Tensor) -> torch.Tensor:
    """The kernel's exp: the GPU's expf (torch.exp on CUDA tensors), numpy's under the
    interpreter."""
    if t.is_cuda:
        return t.exp()
    return torch.from_numpy(np.exp(t.numpy()))


def _pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def _stable_topk(t: torch.Tensor, k: int) -> torch.Tensor:
    return t.sort(dim=-1, descending=True, stable=True).indices[:, :k]


def _kept_groups(choice_TE, cfg: RouterConfig):
    """Grouped routers: (the choice with the experts of groups outside the topk_group best,
    by the sum of their two best choices, ties to the lower group, at -inf; the [T, G] group
    scores), else (the choice unchanged, None)."""
    if not (cfg.n_group > 1 and cfg.topk_group < cfg.n_group):
        return choice_TE, None
    T, E = choice_TE.shape
    G = cfg.n_group
    top2 = choice_TE.view(T, G, E // G).sort(dim=-1, descending=True).values
    group = top2[..., 0] + top2[..., 1]
    keep = torch.zeros_like(group, dtype=torch.bool)
    keep.scatter_(1, _stable_topk(group, cfg.topk_group), True)
    return choice_TE.masked_fill(~keep.repeat_interleave(E // G, dim=1), -math.inf), group


def _emulated(logits_TE, cfg: RouterConfig, bias_E, *, warp: int):
    """The torch router's CUDA arithmetic, one operation at a time in its order, ties to the
    lower id: (weights [T, K] float32, ids [T, K] int32)."""
    x = logits_TE.float()
    T, E = x.shape
    if cfg.scoring == "softmax":  # PersistentSoftmax.cuh: lanes of a warp, then its butterfly
        e2 = _pow2(E)
        w = min(e2, warp)
        xp = torch.full((T, e2), -math.inf, device=x.device)
        xp[:, :E] = x
        e = _exp(xp - xp.amax(dim=1, keepdim=True))
        lanes = e.view(T, e2 // w, w)
        acc = lanes[:, 0]
        for i in range(1, e2 // w):
            acc = acc + lanes[:, i]
        while acc.shape[1] > 1:  # lanes l and l + n / 2
            acc = acc[:, : acc.shape[1] // 2] + acc[:, acc.shape[1] // 2:]
        score = e[:, :E] / acc
    else:
        score = torch.ones_like(x) / (1.0 + _exp(-x))
    choice = score if bias_E is None else score + bias_E.float()
    choice, _ = _kept_groups(choice, cfg)
    ids = _stable_topk(choice, cfg.top_k)
    wk = score.gather(1, ids)
    K = cfg.top_k
    if cfg.norm_topk_prob:  # Reduce.cuh: BW lanes, lane l = w[l] + w[l + BW], tree of halves
        bw = 1 << (K.bit_length() - 1)
        lanes = wk[:, :bw].clone()
        lanes[:, : K - bw] += wk[:, bw:]
        while lanes.shape[1] > 1:
            half = lanes.shape[1] // 2
            lanes = lanes[:, :half] + lanes[:, half:]
        eps = 1e-20 if cfg.scoring == "sigmoid" else 0.0
        wk = wk / (lanes + eps)
    if cfg.routed_scaling_factor != 1.0:
        wk = wk * cfg.routed_scaling_factor
    return wk, ids.to(torch.int32)


def _stable_torch_path(logits_TE, cfg: RouterConfig, bias_E):
    """The torch path's own operations (``routing._scores``, ``_finish_weights``) with its
    top-k breaking ties to the lower id (``_choose``'s invariant top-k; its group score, one
    addition, is the same)."""
    scores = _scores(logits_TE, cfg)
    ids = _choose(scores, cfg, bias_E, invariant=True)
    return _finish_weights(scores.gather(1, ids), cfg).float(), ids.to(torch.int32)


def _fused(logits_TE, cfg, bias_E, rows=None):
    from rocm_moe._routing_triton import fused_route

    r = fused_route(logits_TE=logits_TE, config=cfg, bias_E=bias_E, rows=rows)
    return r.topk_weights, r.topk_ids


def _logits(T: int, cfg: RouterConfig, dtype, gen, *, ties: bool):
    """[T, E] logits: normal (scaled so that sigmoid and softmax spread), or tie-heavy (every
    value on a grid of 16 steps, so scores and group scores tie often)."""
    E = cfg.num_experts
    if ties:
        x = torch.randint(-8, 8, (T, E), generator=gen) * 0.25
    else:
        x = torch.randn(T, E, generator=gen) * 2
    return x.to(dtype).to(DEVICE)


def _tie_free_logits(T: int, cfg: RouterConfig, dtype, gen):
    """[T, E] logits with no two equal scores in a row: a permutation of E distinct values
    k / 16 (exact in bfloat16), so torch.topk's order is the only one."""
    E = cfg.num_experts
    grid = (torch.arange(E) - E // 2).float() / 16
    perm = torch.stack([torch.randperm(E, generator=gen) for _ in range(T)])
    return grid[perm].to(dtype).to(DEVICE)


def _bias(cfg: RouterConfig, gen):
    if cfg.scoring != "sigmoid" or cfg.routed_scaling_factor == 1.0:
        return None  # (one sigmoid case runs without a bias)
    return (torch.rand(cfg.num_experts, generator=gen) * 0.1).to(DEVICE)


def _assert_equal(got, want, what: str):
    (gw, gi), (ww, wi) = got, want
    assert gw.dtype == torch.float32, what
    assert gi.dtype == torch.int32, what
    bad = ~((gi == wi).all(1) & ((gw == ww) | (gw.isnan() & ww.isnan())).all(1))
    assert not bad.any(), (f"{what}: {int(bad.sum())} rows differ, first {int(bad.nonzero()[0])}"
                           f": ids {gi[bad][0].tolist()} vs {wi[bad][0].tolist()}, weights "
                           f"{gw[bad][0].tolist()} vs {ww[bad][0].tolist()}")


def test_docstring_example():
    cfg = RouterConfig(num_experts=3, top_k=1, norm_topk_prob=False)
    w, ids = _fused(torch.tensor([[0.0, 0.0, math.log(2.0)]], device=DEVICE), cfg, None)
    assert ids.tolist() == [[2]]
    assert w.tolist() == [[0.5]]


def _order_grid():
    """(case, T, dtype) of the bit-for-bit test: every case in every dtype at T = 1 and 33; at
    T = 511 (more programs, a partial last one; the interpreter's costliest size) one dtype per
    case on CPUs, the dtypes taking turns over the cases (the dtype only converts the loaded
    logits), every dtype on GPUs."""
    return [(case, T, dtype) for i, case in enumerate(CASES) for T in SIZES
            for dtype in DTYPES if GPU or T != 511 or dtype == DTYPES[i % len(DTYPES)]]


@pytest.mark.parametrize(("case", "T", "dtype"), _order_grid(),
                         ids=lambda v: f"T{v}" if isinstance(v, int) else
                         str(v).split(".")[1] if isinstance(v, torch.dtype) else v)
def test_kernel_computes_the_torch_cuda_order(gen, case, T, dtype):
    """Kernel == ``_emulated`` bit for bit, on normal and on tie-heavy rows."""
    cfg = CASES[case]
    bias = _bias(cfg, gen)
    for ties in (False, True):
        x = _logits(T, cfg, dtype, gen, ties=ties)
        _assert_equal(_fused(x, cfg, bias), _emulated(x, cfg, bias, warp=_warp()),
                      f"{case} ties={ties}")


@pytest.mark.parametrize("case", ["qwen3_E128_K8", "dsv3_E256_K8_G8_TG4"])
def test_bits_do_not_depend_on_rows_per_program(gen, case):
    """One token per program (GPUs) and several (the interpreter's default) agree."""
    cfg = CASES[case]
    bias = _bias(cfg, gen)
    x = _logits(9, cfg, torch.float32, gen, ties=False)
    _assert_equal(_fused(x, cfg, bias, rows=1), _fused(x, cfg, bias, rows=4), case)


def test_ties_go_to_the_lower_id():
    """Equal scores: the lower expert id first; equal group scores: the lower group."""
    x = torch.zeros(1, 8, device=DEVICE)
    w, ids = _fused(x, RouterConfig.mixtral(8, 3), None)
    assert ids.tolist() == [[0, 1, 2]]
    assert len(set(w[0].tolist())) == 1
    cfg = RouterConfig.deepseek_v3(16, 2, n_group=4, topk_group=1)
    _, ids = _fused(torch.zeros(2, 16, device=DEVICE), cfg, None)
    assert ids.tolist() == [[0, 1], [0, 1]]  # groups tie: group 0 kept


def test_route_keeps_the_torch_path_off_gpus(gen):
    """On CPU tensors (even under the interpreter) ``route`` is the torch path, unchanged."""
    if GPU:
        pytest.skip("CPU dispatch")
    cfg = CASES["dsv3_E256_K8_G8_TG4"]
    x, bias = torch.randn(33, 256, generator=gen), torch.rand(256, generator=gen) * 0.1
    got = route(x, cfg, e_score_correction_bias=bias)
    want = _route_torch(x, cfg, bias)
    assert torch.equal(got.topk_weights, want.topk_weights)
    assert torch.equal(got.topk_ids, want.topk_ids)


@pytest.mark.parametrize("case", ["qwen3_E128_K8", "dsv3_E256_K8_G8_TG4", "softmax_E60_K4"])
def test_kernel_agrees_with_the_cpu_router(gen, case):
    """Against today's CPU router (another exp and softmax sum order): the same ids on rows
    with no near-ties, weights within 8 float32 ulps."""
    cfg = CASES[case]
    bias = _bias(cfg, gen)
    x = _tie_free_logits(64, cfg, torch.float32, gen).cpu() + torch.rand(
        64, cfg.num_experts, generator=gen) * 0.01
    w, ids = _fused(x.to(DEVICE), cfg, bias)
    ref = _route_torch(x.cpu(), cfg, None if bias is None else bias.cpu())
    assert torch.equal(ids.cpu(), ref.topk_ids)
    torch.testing.assert_close(w.cpu(), ref.topk_weights, rtol=8 * 2**-24, atol=0)


def test_refuses_what_it_cannot_route():
    from rocm_moe._routing_triton import fused_route, fused_route_unsupported

    cfg = RouterConfig.qwen3_moe(2048, 8)
    assert "num_experts=2048" in fused_route_unsupported(torch.zeros(1, 2048), cfg)
    with pytest.raises(ValueError, match=r"fused_route=num_experts=2048 > 1024.*routing.route"):
        fused_route(logits_TE=torch.zeros(1, 2048), config=cfg)
    assert "float64" in fused_route_unsupported(torch.zeros(1, 8, dtype=torch.float64),
                                                RouterConfig.mixtral(8, 2))
    w, ids = _fused(torch.zeros(0, 8, device=DEVICE), RouterConfig.mixtral(8, 2), None)
    assert w.shape == ids.shape == (0, 2)


# ---- GPUs: the compiled kernel against the torch path itself --------------------------------
needs_gpu = pytest.mark.skipif(not GPU, reason="needs a GPU")
GPU_DTYPES = [torch.bfloat16, torch.float16, torch.float32]


def _assert_close(got, want, what: str, *, ulps: int = 4, max_id_rows: float = 1e-3):
    """The compiled kernel against the torch path's operations with ties broken to the lower
    id, on tied scores: ids equal in all but ``max_id_rows`` of the rows (a tie may pick the
    other, equally valid, expert), and the weights of rows with equal ids within ``ulps``
    float32 ulps."""
    (gw, gi), (ww, wi) = got, want
    assert gw.dtype == torch.float32, what
    assert gi.dtype == torch.int32, what
    same_ids = (gi == wi).all(1)  # (one near tie is allowed in any batch: 1 of 511 seen)
    assert (~same_ids).sum().item() <= max(1.0, max_id_rows * len(gi)), (
        f"{what}: ids differ in {int((~same_ids).sum())} of {len(gi)} rows")
    ulp = torch.finfo(torch.float32).eps * ww.abs().clamp_min(torch.finfo(torch.float32).tiny)
    off = ((gw - ww).abs() > ulps * ulp).any(1) & same_ids
    assert not off.any(), (f"{what}: {int(off.sum())} rows more than {ulps} ulp apart: "
                           f"{gw[off][0].tolist()} vs {ww[off][0].tolist()}")


def _biased_ties(x, cfg: RouterConfig, bias_E) -> torch.Tensor:
    """[T] bool: rows whose choice (score + correction bias) ties exactly where the selection
    looks (the K-th and (K+1)-th kept choices, or two of the K, or the group scores at the
    topk_group boundary). Distinct logits give distinct scores, but a bias can make two biased
    scores equal; torch.topk's order among equals is unspecified on CUDA, the kernel's is the
    lower id first (``test_ties_go_to_the_lower_id``), so such rows agree as sets only."""
    choice = _scores(x, cfg).float()
    if bias_E is not None:
        choice = choice + bias_E.float()
    T, E = choice.shape
    tied = torch.zeros(T, dtype=torch.bool, device=choice.device)
    # the experts are chosen among the kept groups only: look for ties there
    choice, group = _kept_groups(choice, cfg)
    if group is not None:
        g = group.sort(dim=1, descending=True).values[:, : cfg.topk_group + 1]
        tied |= (g[:, 1:] == g[:, :-1]).any(1)
    k = min(cfg.top_k + 1, E)
    c = choice.sort(dim=1, descending=True).values[:, :k]
    return tied | (c[:, 1:] == c[:, :-1]).any(1)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=lambda d: str(d).split(".")[1])
@pytest.mark.parametrize("case", list(CASES))
def test_gpu_kernel_is_the_torch_paths_bits(gen, case, dtype):
    """No ties (rows where the bias makes two choices equal agree as sets: ``_biased_ties``):
    the kernel's ids and weights are ``_route_torch``'s bits on CUDA (each stage
    measured equal on an H100, bench/results/router_bits_h100.txt); ``route(fused=True)`` is
    the kernel's bits, ``route()`` the torch path's. Many seeds, T = 1, 33, 511 and 4096."""
    cfg = CASES[case]
    for _ in range(8):
        bias = _bias(cfg, gen)
        for T in (*SIZES, 4096):
            x = _tie_free_logits(T, cfg, dtype, gen)
            ref = _route_torch(x, cfg, bias)
            want = (ref.topk_weights, ref.topk_ids)
            got = _fused(x, cfg, bias)
            tied = _biased_ties(x, cfg, bias)
            # Every row permutes the same E grid values, so one exact coincidence of two biased
            # scores ties the 1 / (E (E - 1)) of the rows that place those two values on those
            # two experts (0.4% at E = 16; an H100 drew 5 of 511 rows once): a bound that
            # keeps nearly every row compared bit for bit.
            assert tied.sum().item() <= max(1.0, 0.02 * T), f"{case} T={T}: many biased ties"
            assert torch.equal(got[1][tied].sort(1).values, want[1][tied].sort(1).values), (
                f"{case} T={T}: a row with a biased tie chose other experts")
            _assert_equal((got[0][~tied], got[1][~tied]), (want[0][~tied], want[1][~tied]),
                          f"{case} T={T} kernel")
            r = route(x, cfg, e_score_correction_bias=bias, validate=False, fused=True)
            _assert_equal((r.topk_weights, r.topk_ids), got, f"{case} T={T} route(fused)")
            r = route(x, cfg, e_score_correction_bias=bias, validate=False)
            _assert_equal((r.topk_weights, r.topk_ids), want, f"{case} T={T} route")


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=lambda d: str(d).split(".")[1])
@pytest.mark.parametrize("case", list(CASES))
def test_gpu_random_and_tied_scores(gen, case, dtype):
    """Random logits (ties where bfloat16 rounds two logits together) and tie-heavy ones: the
    kernel is close to the torch path's own operations with ties to the lower id."""
    cfg = CASES[case]
    for _ in range(4):
        bias = _bias(cfg, gen)
        for T in SIZES:
            for ties in (False, True):
                x = _logits(T, cfg, dtype, gen, ties=ties)
                _assert_close(_fused(x, cfg, bias), _stable_torch_path(x, cfg, bias),
                              f"{case} T={T} ties={ties}", max_id_rows=0.05)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("case", ["qwen3_E128_K8", "dsv3_E256_K8_G8_TG4"])
def test_gpu_route_in_a_cuda_graph(gen, case):
    """``route(validate=False)`` captures (no host read) and a replay on new logits gives
    the eager bits."""
    cfg = CASES[case]
    bias = _bias(cfg, gen)
    dtype = torch.float32 if cfg.scoring == "sigmoid" else torch.bfloat16
    x = _logits(64, cfg, dtype, gen, ties=False)
    kw = dict(e_score_correction_bias=bias, validate=False, fused=True)
    route(x, cfg, **kw)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = route(x, cfg, **kw)
    x.copy_(_logits(64, cfg, dtype, gen, ties=False))
    graph.replay()
    eager = route(x, cfg, **kw)
    _assert_equal((out.topk_weights, out.topk_ids), (eager.topk_weights, eager.topk_ids), case)


def test_layer_fused_router_flag():
    from rocm_moe import EPMoE

    cfg = RouterConfig.qwen3_moe(8, 2)
    with pytest.raises(TypeError, match="fused_router"):
        EPMoE(hidden_size=8, intermediate_size=4, router=cfg, fused_router="yes")
    a = EPMoE(hidden_size=8, intermediate_size=4, router=cfg)
    b = EPMoE(hidden_size=8, intermediate_size=4, router=cfg, fused_router=True)
    x = torch.randn(5, 8)
    assert torch.equal(a(x), b(x))  # on CPUs the torch path runs either way


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy's exp(inf), inf - inf
@pytest.mark.parametrize("case", ["dsv3_E256_K8_G8_TG4", "sigmoid_E160_K8_G8_TG4",
                                  "softmax_E60_K4", "sigmoid_E96_K5_G3_TG2_nonorm"])
def test_ids_distinct_whatever_the_scores(gen, case):
    """NaN and infinite logits, a -inf bias (every choice -inf), zero scores with a bias of
    -0.0 and +0.0: the ids of a row stay distinct and in [0, E) (route(validate=False) lets
    such values through), and equal choices go to the lower ids."""
    cfg = CASES[case]
    E, K = cfg.num_experts, cfg.top_k
    x = torch.randn(6, E, generator=gen) * 2
    x[0] = math.nan
    x[1, ::3] = math.nan
    x[2] = math.inf
    x[3] = -math.inf
    x[4, 1::2] = -math.inf
    rows = [x]
    biases = [None]
    if cfg.scoring == "sigmoid":
        rows.append(torch.randn(6, E, generator=gen))
        biases.append(torch.full((E,), -math.inf))
        z = torch.full((2, E), -20000.0)  # sigmoid 0: +0.0 scores; bias -0.0 / +0.0 per id
        rows.append(z)
        biases.append(torch.where(torch.arange(E) % 2 == 0, -0.0, 0.0))
    for logits, bias in zip(rows, biases, strict=True):
        bias = None if bias is None else bias.to(DEVICE)
        ids = _fused(logits.to(DEVICE), cfg, bias)[1].cpu()
        assert bool(((ids >= 0) & (ids < E)).all()), ids
        assert all(len(set(r)) == K for r in ids.tolist()), ids
    assert ids.tolist()[0] == list(range(K))  # equal choices (0 or +inf): the lowest ids
