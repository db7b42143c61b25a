"""Issue 34, "beyond the list": the public surfaces added in the session before (comm.pool, the
model stack, bench model, route(fused=True), chunked batches) tried with malformed and unusual
inputs. Each test failed before its fix (a silent wrong value, an internal crash, a refusal
after work, a peer left waiting)."""

from __future__ import annotations

import datetime

import pytest
import torch

from rocm_moe import EPMoE, Placement, RouterConfig
from rocm_moe.comm import pool
from rocm_moe.comm.local import LocalDispatcher
from rocm_moe.model import MoEStack

E, H, I, K, CAP = 8, 16, 8, 2, 8


def _disp(cap: int | None = CAP) -> LocalDispatcher:
    return LocalDispatcher(Placement.contiguous(E, 1), hidden_size=H, top_k=K,
                           dtype=torch.float32, max_tokens_per_rank=cap)


def _layer() -> EPMoE:
    layer = EPMoE(hidden_size=H, intermediate_size=I, router=RouterConfig.qwen3_moe(E, K),
                  dispatcher=_disp(), dtype=torch.float32)
    layer.reset_parameters(seed=0)
    return layer


# ---- forward_routed of a batch above capacity (chunks) -----------------------------------------


@pytest.mark.parametrize("rows", [24, 16, 19], ids=["more_ids", "fewer_ids", "one_short"])
def test_routed_rows_checked_against_the_whole_batch(rows):
    """20 tokens at capacity 8 run in 3 chunks: routing for 24 or 16 tokens was refused by the
    last chunk's dispatch ("topk_ids.shape=[8, 2]: must be [4, 2]"), after two chunks had run
    and naming a chunk the caller never made; now refused first, naming T=20."""
    layer = _layer()
    x = torch.randn(20, H)
    r = layer.route_tokens(torch.randn(rows, H))
    with pytest.raises(ValueError, match=rf"^topk_weights\.shape=\[{rows}, 2\]: must be "
                       r"\[20, 2\]") as err:
        layer.forward_routed(x, r.topk_weights, r.topk_ids)
    assert "Fix: pass [T=20, K=2]" in str(err.value)


# ---- route(fused=...) ----------------------------------------------------------------------------


@pytest.mark.parametrize("field", ["fused", "invariant", "validate"])
@pytest.mark.parametrize("value", ["no", 1, None], ids=["str", "int", "none"])
def test_route_flags_must_be_bools(field, value):
    """route(fused="no") was taken as True (the Triton router on GPUs; silently ignored on
    CPUs), and so were invariant="no" and validate="no"; EPMoE(fused_router=) already refused
    it."""
    from rocm_moe.routing import route

    with pytest.raises(TypeError, match=rf"^{field}={value!r}: must be a bool"):
        route(torch.randn(3, E), RouterConfig.qwen3_moe(E, K), **{field: value})


# ---- comm.pool ---------------------------------------------------------------------------------

COMM_BYTES = {  # (args, kwargs, error, match); each returned a number (0 or negative) or crashed
    "unknown_name": (("smym", 2, 8, 16, 2), {}, ValueError, r"^name='smym': must be one of"),
    "fp8_form": (("symm-fp8", 2, 8, 128, 2), {}, ValueError, r"^name='symm-fp8'"),
    "world_size_0": (("symm", 0, 8, 16, 2), {}, ValueError, r"^world_size=0: must be >= 1"),
    "world_size_float": (("symm", 2.5, 8, 16, 2), {}, TypeError, r"^world_size=2.5: must be an"),
    "tokens_negative": (("symm", 2, -8, 16, 2), {}, ValueError,
                        r"^max_tokens_per_rank=-8: must be >= 1"),
    "hidden_0": (("torch", 2, 8, 0, 2), {}, ValueError, r"^hidden_size=0"),
    "dtype_str": (("symm", 2, 8, 16, 2), {"dtype": "bfloat16"}, TypeError,
                  r"^dtype='bfloat16': must be a floating torch.dtype"),
}


@pytest.mark.parametrize(("args", "kw", "error", "match"), list(COMM_BYTES.values()),
                         ids=list(COMM_BYTES))
def test_comm_bytes_refuses_what_it_cannot_size(args, kw, error, match):
    with pytest.raises(error, match=match):
        pool.comm_bytes(*args, **kw)


def test_comm_bytes_of_the_backends():
    assert pool.comm_bytes("symm", 2, 8, 16, 2) > 0
    assert pool.comm_bytes("torch", 2, 8, 16, 2) == pool.comm_bytes("local", 1, 8, 16, 2) == 0


@pytest.mark.parametrize(("args", "error", "match"), [
    (("4096",), TypeError, r"^tokens_per_rank='4096': must be an int"),
    ((0,), ValueError, r"^tokens_per_rank=0"),
    ((16, (4, 0)), ValueError, r"^ep_sizes\[\]=0"),
], ids=["str", "zero", "ep_0"])
def test_memory_rows_checks_its_arguments(args, error, match):
    """memory_rows("4096") crashed in the size arithmetic (TypeError: bad operand type)."""
    with pytest.raises(error, match=match):
        pool.memory_rows(*args)


SHARED = {  # (kwargs, error, match)
    "unhashable_option": ({"kernel_type": ["auto"]}, TypeError,
                          r"^kernel_type=\['auto'\]: backend options are part of the pool's key"),
    "hidden_float": ({"hidden_size": 16.0}, TypeError, r"^hidden_size=16.0: must be an int"),
    "top_k_0": ({"top_k": 0}, ValueError, r"^top_k=0: must be >= 1"),
    "dtype_str": ({"dtype": "float32"}, TypeError, r"^dtype='float32'"),
}


@pytest.mark.parametrize(("kw", "error", "match"), list(SHARED.values()), ids=list(SHARED))
def test_shared_dispatcher_checks_its_key(kw, error, match):
    """A list option crashed hashing the key (TypeError: unhashable type: 'list'); a float
    hidden size or a dtype name built a dispatcher under a key of its own (16.0 != 16 as a
    key part, and a str dtype that no tensor matches)."""
    args = dict(name="local", hidden_size=H, top_k=K, dtype=torch.float32,
                max_tokens_per_rank=CAP) | kw
    pool.clear()
    with pytest.raises(error, match=match):
        pool.shared_dispatcher(args.pop("name"), Placement.contiguous(E, 1), **args)
    assert pool.shared_dispatchers() == []


def test_fastest_backends_take_a_device_string_and_check_world_size():
    """fastest_experts("cpu") crashed (AttributeError: 'str' object has no attribute 'type');
    fastest_comm(1.5, ...) answered torch."""
    assert pool.fastest_experts("cpu")[0] == pool.fastest_experts(torch.device("cpu"))[0]
    with pytest.raises(TypeError, match=r"^world_size=1.5: must be an int"):
        pool.fastest_comm(1.5, torch.device("cpu"))
    with pytest.raises(TypeError, match=r"^device=3.5: must be a torch.device"):
        pool.fastest_experts(3.5)


# ---- model.MoEStack --------------------------------------------------------------------------


def _stack(n: int = 2, **kw) -> MoEStack:
    return MoEStack.build(n, hidden_size=H, intermediate_size=I,
                          router=RouterConfig.qwen3_moe(E, K), dispatcher=_disp(),
                          dtype=torch.float32, device="cpu", **kw)


def _bad_stack_input(kind: str) -> torch.Tensor:
    if kind == "hidden":
        return torch.randn(5, H - 1)
    if kind == "integer":
        return torch.ones(5, H, dtype=torch.int64)
    x = torch.randn(5, H)
    x[1, 2] = float("inf")
    return x


STACK_INPUTS = {  # each crashed in the first norm, or was reported as the norm's NaN
    "hidden": (ValueError, r"^hidden_states\.shape=\[5, 15\]: must be \[T, H\] or \[B, S, H\]"),
    "integer": (TypeError, r"^hidden_states\.dtype=torch.int64"),
    "inf": (ValueError, r"^hidden_states=contains inf at \[1, 2\]"),
}


@pytest.mark.parametrize("kind", list(STACK_INPUTS))
def test_stack_checks_its_input_before_the_first_norm(kind):
    error, match = STACK_INPUTS[kind]
    with pytest.raises(error, match=match):
        _stack()(_bad_stack_input(kind))


def test_stack_build_and_init_arguments():
    """seed=1.5 crashed in manual_seed (RuntimeError); a generator of layers in indexing."""
    with pytest.raises(TypeError, match=r"^seed=1.5: must be an int"):
        _stack(seed=1.5)
    s = _stack(3)
    assert len(MoEStack(la for la in s.layers).layers) == 3
    x = torch.randn(20, H)  # 3 chunks at capacity 8, the same bits as the chunks one by one
    assert torch.equal(s(x), torch.cat([s(x[:8]), s(x[8:16]), s(x[16:])]))


def _stack_peer_worker(info, kind: str) -> str:
    """Rank 1 gives the stack a bad input; what each rank raised."""
    from rocm_moe.comm.torch import TorchDispatcher

    torch.set_grad_enabled(False)
    disp = TorchDispatcher(Placement.contiguous(E, info.world_size), hidden_size=H, top_k=K,
                           dtype=torch.float32, max_tokens_per_rank=CAP,
                           timeout=datetime.timedelta(seconds=20))
    stack = MoEStack.build(2, hidden_size=H, intermediate_size=I,
                           router=RouterConfig.qwen3_moe(E, K), dispatcher=disp,
                           dtype=torch.float32)
    x = _bad_stack_input(kind) if info.rank == 1 else torch.randn(5, H)
    try:
        stack(x)
        seen = "returned"
    except Exception as exc:
        seen = f"{type(exc).__name__}: {exc}"
    stack(torch.randn(3, H))  # the group is still in step
    return seen


def test_a_bad_stack_input_on_one_rank_is_refused_on_every_rank():
    """Rank 1's [5, 15] input crashed in its norm (RuntimeError) while rank 0 waited in layer 0's
    dispatch until the group's timeout; now rank 1 refuses it and rank 0 raises PeerRefusal
    naming rank 1, at once, and the group stays usable."""
    from rocm_moe.distributed import launch

    out = launch(2, _stack_peer_worker, "hidden", backend="gloo", timeout_s=60,
                 threads_per_rank=1)
    assert out[1].startswith("ValueError: hidden_states.shape=[5, 15]"), out
    assert out[0].startswith("PeerRefusal: "), out
    assert "rank(s) [1]" in out[0], out
