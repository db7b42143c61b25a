"""Input checks shared by every public boundary.

Every user error raises ``ValueError`` or ``TypeError`` whose message names the field, the value
that was given, the rule it broke and how to fix it. Checks run before any collective starts, so
all ranks of a group fail the same way instead of one rank hanging in an all-to-all.

Shape checks are free. Value checks (id ranges, NaN weights) read the tensor on the host, which
synchronises a GPU stream; callers skip them with ``validate=False`` on the hot path, and they are
skipped automatically while a CUDA graph is being captured (a host read is illegal there).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch

_INT_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def error_message(field: str, value: object, rule: str, fix: str) -> str:
    """One format for every user error: ``field=value: rule. Fix: fix.``"""
    return f"{field}={value}: {rule}. Fix: {fix}."


def env_count(name: str, default: int | None, fix: str, *, minimum: int = 0,
              rule: str = "must be an int >= 0") -> int | None:
    """The environment variable ``name`` as an int >= ``minimum`` (ASCII digits only),
    ``default`` where it is unset or empty; anything else a ValueError naming it, with ``rule``
    and ``fix``."""
    env = os.environ.get(name, "")
    if env == "":
        return default
    if not (env.isascii() and env.isdigit()) or int(env) < minimum:  # ("²".isdigit() is True)
        raise ValueError(error_message(name, repr(env), rule, fix))
    return int(env)


def env_tokens(name: str, fix: str) -> int | None:
    """The serving plug-ins' ROCM_MOE_*_MAX_TOKENS: a token capacity >= 1, None where unset or
    empty (``env_count``; each engine then checks it against its largest CUDA-graph batch)."""
    return env_count(name, None, fix, minimum=1, rule="must be an integer >= 1 (tokens per rank)")


SWITCH_ON = ("1", "true", "yes", "on")
SWITCH_OFF = ("", "0", "false", "no", "off")


def env_switch(name: str) -> bool:
    """The environment variable ``name`` as an on/off switch: 1/true/yes/on or unset/empty/
    0/false/no/off (any case); anything else a ValueError naming it (a typo such as "ture"
    must not leave a plug-in silently off)."""
    env = os.environ.get(name, "")
    if env.strip().lower() in SWITCH_ON:
        return True
    if env.strip().lower() in SWITCH_OFF:
        return False
    raise ValueError(error_message(name, repr(env), f"must be one of {list(SWITCH_ON)} (on) or "
                                   f"{list(SWITCH_OFF[1:])} (off), any case",
                                   f"set {name}=1 to turn it on, or unset it"))


def describe(t: object) -> str:
    """Short description of a tensor for messages (shape, dtype, device), or the repr."""
    if isinstance(t, torch.Tensor):
        return f"Tensor(shape={list(t.shape)}, dtype={t.dtype}, device={t.device})"
    return repr(t)


def value_checks_allowed(t: torch.Tensor) -> bool:
    """Host reads are illegal inside CUDA graph capture; skip value checks there."""
    return not (t.is_cuda and torch.cuda.is_current_stream_capturing())


def check_tensor(
    field: str,
    t: object,
    *,
    shape: Sequence[int | None] | None = None,
    dtypes: Sequence[torch.dtype] | None = None,
    fix: str = "",
) -> torch.Tensor:
    """Check type, shape (``None`` = any size in that dimension) and dtype of a tensor."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(
            error_message(field, describe(t), "must be a torch.Tensor", fix or "pass a tensor")
        )
    if shape is not None:
        ok = t.dim() == len(shape) and all(
            want is None or got == want for got, want in zip(t.shape, shape, strict=False)
        )
        if not ok:
            want = "[" + ", ".join("*" if s is None else str(s) for s in shape) + "]"
            raise ValueError(
                error_message(
                    f"{field}.shape",
                    list(t.shape),
                    f"must be {want}",
                    fix or f"reshape {field} to {want}",
                )
            )
    if dtypes is not None and t.dtype not in dtypes:
        names = ", ".join(str(d) for d in dtypes)
        raise TypeError(
            error_message(
                f"{field}.dtype",
                t.dtype,
                f"must be one of ({names})",
                fix or f"convert with {field}.to({dtypes[0]})",
            )
        )
    return t


def check_integer(field: str, t: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(error_message(field, describe(t), "must be a tensor of integer ids",
                                      f"pass a torch tensor, e.g. torch.tensor({field})"))
    if t.dtype not in _INT_DTYPES:
        raise TypeError(
            error_message(
                f"{field}.dtype",
                t.dtype,
                "expert ids must have an integer dtype",
                f"pass integer ids, e.g. {field}.to(torch.int32); never reinterpret a buffer",
            )
        )


def check_integer_value(field: str, value: object, *, minimum: int,
                        fix: str | None = None) -> None:
    """A Python int (not a bool, not a float) of at least ``minimum`` (``fix``: what the
    ValueError of a smaller one says to do)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(error_message(field, repr(value), "must be an int",
                                      f"pass {field} as an int"))
    if value < minimum:
        raise ValueError(error_message(field, value, f"must be >= {minimum}",
                                       fix or f"pass an int >= {minimum}"))


def check_bool(field: str, value: object, *, allow_none: bool = False,
               fix: str = "pass True or False") -> None:
    """A bool (None too where ``allow_none``): a truthy string such as "no" must not switch a
    mode on."""
    if not (isinstance(value, bool) or (allow_none and value is None)):
        rule = "must be True, False or None" if allow_none else "must be a bool"
        raise TypeError(error_message(field, repr(value), rule, fix))


def check_id_range(
    field: str, ids: torch.Tensor, num_experts: int, *, allow_minus_one: bool
) -> None:
    """Every id lies in [0, E), or is -1 (an empty slot) where that is allowed."""
    if ids.numel() == 0 or not value_checks_allowed(ids):
        return
    lo, hi = int(ids.min()), int(ids.max())
    low_ok = lo >= (-1 if allow_minus_one else 0)
    if low_ok and hi < num_experts:
        return
    bad = lo if not low_ok else hi
    rule = f"expert ids must lie in [0, {num_experts})"
    if allow_minus_one:
        rule += " or be -1 for an empty slot"
    raise ValueError(
        error_message(
            field,
            f"contains {bad}",
            rule,
            "check the router and the expert count; an int64 buffer read as int32 gives such "
            "values",
        )
    )


def check_unique_rows(field: str, ids: torch.Tensor) -> None:
    """No id appears twice in one row (ignoring -1 slots)."""
    if ids.shape[-1] < 2 or ids.numel() == 0 or not value_checks_allowed(ids):
        return
    s, _ = ids.sort(dim=-1)
    dup = (s[..., 1:] == s[..., :-1]) & (s[..., 1:] >= 0)
    if bool(dup.any()):
        row = int(dup.any(dim=-1).nonzero()[0, 0])
        raise ValueError(
            error_message(
                f"{field}[{row}]",
                ids[row].tolist(),
                "an expert may appear at most once per token",
                "choose K distinct experts for each token",
            )
        )


def check_weights(field: str, w: torch.Tensor) -> None:
    """Routing weights are finite and non-negative."""
    if w.numel() == 0 or not value_checks_allowed(w):
        return
    finite = torch.isfinite(w)
    if not bool(finite.all()):
        bad = w[~finite][0].item()
        raise ValueError(
            error_message(
                field, f"contains {bad}", "routing weights must be finite", "check the router"
            )
        )
    if bool((w < 0).any()):
        bad = w[w < 0][0].item()
        raise ValueError(
            error_message(
                field,
                f"contains {bad}",
                "routing weights must be >= 0 (softmax or sigmoid scores)",
                "pass the router's probabilities, not its logits",
            )
        )


def check_finite(field: str, t: torch.Tensor, fix: str) -> None:
    """No NaN or infinity in ``t`` (a value check: skipped under CUDA graph capture)."""
    if t.numel() == 0 or not value_checks_allowed(t):
        return
    finite = torch.isfinite(t)
    if not bool(finite.all()):
        bad = t[~finite][0].item()
        where = [int(i) for i in (~finite).nonzero()[0]]
        raise ValueError(error_message(field, f"contains {bad} at {where}", "must be finite", fix))


def check_same_device(fields: dict[str, torch.Tensor]) -> None:
    devices = {name: t.device for name, t in fields.items()}
    if len(set(devices.values())) > 1:
        raise ValueError(
            error_message(
                "devices",
                {k: str(v) for k, v in devices.items()},
                "all tensors of one call must be on one device",
                "move them with .to(x.device)",
            )
        )


def check_routing_rows(topk_weights: object, topk_ids: object, num_tokens: int,
                       top_k: int) -> None:
    """A caller's routing of ``num_tokens`` tokens: [T, K] weights and ids, checked against
    the whole batch before it is cut into chunks (a mismatch was refused per chunk, naming the
    chunk's size, after the earlier chunks had run)."""
    for field, t, what in (("topk_weights", topk_weights, "float32 weights"),
                           ("topk_ids", topk_ids, "ids (pad unused slots with -1)")):
        check_tensor(field, t, shape=(num_tokens, top_k),
                     fix=f"pass [T={num_tokens}, K={top_k}] {what}, one row per token of "
                     "hidden_states")
