"""One comm resource per model: every MoE layer of a model borrows the same dispatcher.

A dispatcher with fixed buffers (symm: one symmetric allocation; MORI: one op on the process's
shmem heap) costs memory in proportion to its capacity, not to the layers that use it: MoE
layers run one after another, so one buffer serves all of them. vLLM (``MoriAll2AllManager``
and its handle cache) and SGLang (``init_mori_op`` under an lru_cache) build one MORI op for the
whole model for the same reason; one op per layer exhausts MORI's 4 GiB default heap after 3 or
4 DeepSeek-V3 layers.

    shared_dispatcher("symm", placement, hidden_size=H, top_k=K, dtype=bf16,
                      max_tokens_per_rank=cap, group=ep_group)   # the same object every call

Sharing is safe: a backend whose received rows are views of its buffers (``holds_batch``)
refuses a dispatch while another batch (another layer's) is dispatched but not combined, naming
both. A second batch in flight at once takes more buffers: a dispatcher built with
``batches_in_flight=2`` (``EPMoE(micro_batches=2)``'s overlap: one more receive section on symm,
one more op on MORI; a layer that dispatches while both hold un-combined batches is refused the
same way), or a second dispatcher: ``slot=1``.

``fastest_comm`` / ``fastest_experts``: the backends an engine plug-in defaults to where the user
named none, with the reason, logged once per process.
"""

from __future__ import annotations

import logging

import torch

from rocm_moe._checks import check_integer_value, error_message
from rocm_moe.comm.base import Dispatcher, group_hosts
from rocm_moe.placement import Placement

log = logging.getLogger("rocm_moe")

_POOL: dict[tuple, tuple[Dispatcher, object]] = {}  # key -> (dispatcher, its group, kept alive)
_LOGGED: set[str] = set()


def _key(name, placement, group, rank, hidden_size, top_k, dtype, cap, slot, extra) -> tuple:
    key = (name, placement.experts_of_rank, placement.num_experts, id(group), rank,
           hidden_size, top_k, str(dtype), cap, slot, tuple(sorted(extra.items())))
    try:
        hash(key)
    except TypeError:
        bad = next(k for k, v in extra.items() if not _hashable(v))
        raise TypeError(error_message(
            bad, repr(extra[bad]), "backend options are part of the pool's key, so they must "
            "be hashable", "pass a tuple, a str or a number (not a list or dict)")) from None
    return key


def _hashable(value) -> bool:
    try:
        hash(value)
    except TypeError:
        return False
    return True


def _check_sizes(*, name: object, world_size: object = None, **sizes: object) -> None:
    """A backend name of ``backends.names("comm")`` and sizes that are ints >= 1 (the shared
    checks of ``shared_dispatcher``, ``comm_bytes`` and ``memory_rows``)."""
    from rocm_moe import backends

    if name is not None and name not in backends.names("comm"):
        raise ValueError(error_message(
            "name", repr(name), f"must be one of {backends.names('comm')}", "pick one of them "
            "(an FP8 form such as symm-fp8 is not a pooled backend)"))
    if world_size is not None:
        check_integer_value("world_size", world_size, minimum=1)
    for field, value in sizes.items():
        check_integer_value(field, value, minimum=1)


def _check_dtype(dtype: object) -> None:
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(error_message("dtype", repr(dtype), "must be a floating torch.dtype",
                                      "pass e.g. torch.bfloat16"))


def shared_dispatcher(name: str, placement: Placement, *, hidden_size: int, top_k: int,
                      dtype: torch.dtype, max_tokens_per_rank: int | None, group=None,
                      rank: int = 0, slot: int = 0, **backend_kw) -> Dispatcher:
    """The process's dispatcher for (backend, EP group, placement, H, K, dtype, capacity, slot):
    built on the first call (collectively, on every rank of ``group``: every rank must ask for
    the same key in the same order, as the layers of one model do) and returned as is after.

    ``rank``: the rank in the group (checked against the group's own); ``slot``: 0 for the
    model's dispatcher, 1.. for extra batches in flight at once; ``backend_kw``: the backend's
    own options (e.g. MORI's ``kernel_type``), part of the key."""
    from rocm_moe import backends

    if not isinstance(placement, Placement):
        raise TypeError(error_message("placement", type(placement).__name__,
                                      "must be a rocm_moe.Placement",
                                      "use Placement.contiguous(E, W)"))
    check_integer_value("slot", slot, minimum=0)
    if max_tokens_per_rank is not None:
        check_integer_value("max_tokens_per_rank", max_tokens_per_rank, minimum=1)
    _check_sizes(name=None, hidden_size=hidden_size, top_k=top_k)  # (name: backends checks it)
    _check_dtype(dtype)
    key = _key(name, placement, group, rank, hidden_size, top_k, dtype, max_tokens_per_rank,
               slot, backend_kw)
    if key in _POOL:
        return _POOL[key][0]
    kw = dict(hidden_size=hidden_size, top_k=top_k, dtype=dtype,
              max_tokens_per_rank=max_tokens_per_rank, **backend_kw)
    if name != "local":
        kw["group"] = group
    disp = backends.make_dispatcher(name, placement, rank, **kw)
    _POOL[key] = (disp, group)
    held = 0 if max_tokens_per_rank is None else comm_bytes(
        name, placement.world_size, max_tokens_per_rank, hidden_size, top_k, dtype,
        placement.num_experts, batches_in_flight=backend_kw.get("batches_in_flight", 1))
    log.info("rocm_moe: built the shared %s dispatcher (W=%d, H=%d, K=%d, %s, %s tokens per "
             "rank, slot %d): %s per GPU", name, placement.world_size, hidden_size, top_k,
             dtype, max_tokens_per_rank, slot, human_bytes(held))
    return disp


def shared_dispatchers() -> list[Dispatcher]:
    """Every dispatcher of the pool (tests assert that a model's layers share one)."""
    return [d for d, _ in _POOL.values()]


def clear() -> None:
    """Forget every shared dispatcher (their buffers go when the last layer lets go of them)."""
    _POOL.clear()


# ---- memory ---------------------------------------------------------------------------------
def comm_bytes(name: str, world_size: int, max_tokens_per_rank: int, hidden_size: int,
               top_k: int, dtype: torch.dtype = torch.bfloat16, num_experts: int = 256, *,
               batches_in_flight: int = 1) -> int:
    """Device bytes one dispatcher of backend ``name`` holds per GPU (the whole model's comm
    memory, since every layer shares it): symm's symmetric buffer, MORI's heap share of one
    op per batch in flight; 0 for the torch and local backends (their buffers follow each
    batch). An unknown name is refused (it returned 0, as if the backend held nothing).
    ``batches_in_flight=2`` (micro-batch overlap): symm adds a lane (receive, ids, weights
    and token sections and a count matrix), MORI a second op."""
    _check_sizes(name=name, world_size=world_size, max_tokens_per_rank=max_tokens_per_rank,
                 hidden_size=hidden_size, top_k=top_k, num_experts=num_experts,
                 batches_in_flight=batches_in_flight)
    _check_dtype(dtype)
    W, cap, H, K, L = world_size, max_tokens_per_rank, hidden_size, top_k, batches_in_flight
    if name == "symm":
        from rocm_moe.comm.base import check_row_bytes
        from rocm_moe.comm.symm import buffer_layout

        check_row_bytes(H, dtype)
        return buffer_layout(W, cap, H, K, dtype, batches_in_flight=L).total
    if name == "mori":
        from rocm_moe.comm.mori import heap_bytes, mori_config

        cfg = mori_config(Placement.contiguous(num_experts, W), 0, hidden_size=H, top_k=K,
                          dtype=dtype, max_tokens_per_rank=cap, kernel_type="auto",
                          gpu_per_node=min(W, 8), fp8_dtype=None)
        return L * heap_bytes(cfg)
    return 0


def human_bytes(n: int) -> str:
    """``n`` bytes in MiB, or GiB from 1 GiB on."""
    return f"{n / 2**20:.1f} MiB" if n < 2**30 else f"{n / 2**30:.2f} GiB"


# ---- defaults for the engine plug-ins -------------------------------------------------------
def _log_once(what: str, message: str) -> None:
    if what not in _LOGGED:
        _LOGGED.add(what)
        log.warning("rocm_moe: %s", message)


def _one_host(group) -> bool:
    """Collective: every rank of ``group`` on this host."""
    return len(set(group_hosts(group))) == 1


def _device(device: object) -> torch.device:
    """``device`` as a torch.device (a str such as "cuda:0" is converted)."""
    if isinstance(device, torch.device):
        return device
    try:
        return torch.device(device)
    except (RuntimeError, TypeError):
        raise TypeError(error_message(
            "device", repr(device), "must be a torch.device or a device string",
            "pass e.g. torch.device('cuda', 0)")) from None


def fastest_comm(world_size: int, device: torch.device, group=None, *,
                 engine: str = "rocm_moe", mori_refusal: str | None = None) -> tuple[str, str]:
    """(backend, reason): the fastest comm backend that runs here: MORI on ROCm GPUs with MORI
    installed (unless ``mori_refusal`` says why MORI cannot take this model, e.g. experts that
    do not split into equal contiguous ranges), else ``backends.default_comm`` (local for one
    rank, symm on the GPUs of one host, torch across hosts and on CPUs). Collective when
    ``world_size > 1`` on a GPU (the host check); the choice is logged once per process."""
    from rocm_moe import backends

    check_integer_value("world_size", world_size, minimum=1)
    device = _device(device)
    gpus = world_size > 1 and device.type == "cuda"
    mori = gpus and backends.BACKENDS["comm:mori"].availability() is None
    if mori and mori_refusal is None:
        name, why = "mori", "ROCm GPUs with MORI installed"
    else:
        name, why = backends.default_comm(world_size, device,
                                          multi_host=gpus and not _one_host(group))
        if mori:
            why += f"; not mori: {mori_refusal}"
    _log_once(f"{engine}-comm", f"{engine} comm backend {name!r} ({why}); set it explicitly "
              "to override")
    return name, why


def fastest_experts(device: torch.device, *, dtype: torch.dtype | None = None,
                    engine: str = "rocm_moe") -> tuple[str, str]:
    """(backend, reason): AITER on ROCm GPUs with AITER installed, else
    ``backends.default_experts`` (Triton on GPUs, the reference elsewhere); logged once."""
    from rocm_moe import backends

    device = _device(device)
    if device.type == "cuda" and backends.BACKENDS["experts:aiter"].availability() is None:
        name, why = "aiter", "ROCm GPUs with AITER installed"
    else:
        name, why = backends.default_experts(device, dtype=dtype)
    _log_once(f"{engine}-experts", f"{engine} experts backend {name!r} ({why}); set it "
              "explicitly to override")
    return name, why


MEMORY_MODELS = {"Qwen3-30B-A3B": (128, 2048, 8), "DeepSeek-V3": (256, 7168, 8)}  # E, H, K


def memory_rows(tokens_per_rank: int = 4096, ep_sizes=(4, 8, 16)) -> list[dict]:
    """Comm memory per GPU of one shared dispatcher (the whole model's, whatever its layer
    count), bf16 rows, for the MEMORY_MODELS at ``ep_sizes``: what ``rocm-moe info`` prints."""
    check_integer_value("tokens_per_rank", tokens_per_rank, minimum=1)
    for W in ep_sizes:
        check_integer_value("ep_sizes[]", W, minimum=1)
    rows = []
    for model, (E, H, K) in MEMORY_MODELS.items():
        for W in ep_sizes:
            rows.append(dict(model=model, ep=W, tokens_per_rank=tokens_per_rank, **{
                name: comm_bytes(name, W, tokens_per_rank, H, K, torch.bfloat16, E)
                for name in ("symm", "mori")}))
    return rows
