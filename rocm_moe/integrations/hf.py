"""Real checkpoints and transformers models.

- ``Checkpoint(dir)``: a safetensors checkpoint directory (one ``model.safetensors`` or shards
  with ``model.safetensors.index.json``), read tensor by tensor, safetensors only (nothing is
  unpickled). A missing or corrupt shard raises a ValueError naming the file and the tensor.
- ``load_moe_layer(dir, layer, placement, rank)``: one MoE layer's router and shared experts
  plus THIS rank's routed experts only (the others are never read), for the families of
  ``rocm_moe.families``, which name the tensors (``mlp.experts.{e}.{gate,up,down}_proj``,
  ``block_sparse_moe.experts.{e}.{w1,w3,w2}``, shared experts, ``gate.e_score_correction_bias``;
  gpt-oss's and Llama 4's fused ``experts.gate_up_proj`` [E, H, 2I], of which only this rank's
  rows are read, de-interleaved into gate rows then up rows for gpt-oss, with its biases).
  ``weights_from_block`` does the same from a loaded transformers 5 block.
- ``register()``: makes "rocm_moe" a transformers experts implementation, so a model runs its
  experts through rocm_moe with ``model.set_experts_implementation("rocm_moe")`` (or
  ``from_pretrained(..., experts_implementation="rocm_moe")``). The backend travels inside the
  registered ``ExpertsFunction``; transformers' registry is the only place it is kept.
- ``replace_moe_blocks(model, dispatcher_factory)``: swaps every MoE block of a transformers
  model for an EPMoE that shares its router and holds only this rank's experts.
"""

from __future__ import annotations

import json
import stat
from collections.abc import Callable
from dataclasses import dataclass, replace
from operator import attrgetter
from pathlib import Path

import torch
from torch import nn

from rocm_moe._checks import check_finite, check_integer_value, error_message
from rocm_moe.comm.base import Dispatcher, require_placement
from rocm_moe.experts.base import PLAIN, Experts, ExpertVariant, variant_kwargs
from rocm_moe.experts.reference import ReferenceExperts
from rocm_moe.families import (
    CONFIG_ALIASES,
    ExpertTensors,
    FusedExpertTensors,
    ModelFamily,
    check_activation,
    family,
)
from rocm_moe.formats.block_fp8 import read_block_fp8
from rocm_moe.formats.mxfp4 import FusedExpert, MXFP4Tensor, MXFP4Weights, deinterleave_rows
from rocm_moe.layer import EPMoE
from rocm_moe.placement import Placement
from rocm_moe.quant import FP8_DTYPES, BlockFP8Weight
from rocm_moe.routing import RouterConfig

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


class Checkpoint:
    """Read tensors of a safetensors checkpoint directory one at a time.

    Trust model: the directory's files are data, never code (safetensors only), and every file
    read (the index, config.json and each shard the index names) must resolve to a regular file
    inside ``root`` (default: the checkpoint directory itself). An index entry such as
    ``../x.safetensors`` or ``/etc/passwd``, a symlink pointing out of ``root``, a FIFO or a
    device is refused with a ValueError naming the file before anything is opened. A Hugging
    Face cache snapshot links its files to ``../../blobs``: pass the model's cache folder as
    ``root`` for it. Every malformed index, config or shard raises a ValueError naming the file.
    """

    def __init__(self, directory: str | Path, *, root: str | Path | None = None):
        self.dir = Path(directory).resolve()
        self.root = Path(root).resolve() if root is not None else self.dir
        if not self.dir.is_relative_to(self.root):
            raise ValueError(error_message(
                "root", str(self.root), f"must contain the checkpoint directory {self.dir}",
                "pass the checkpoint's directory or a folder above it"))
        index = self.dir / INDEX
        if index.exists() or index.is_symlink():
            self.weight_map = self._read_index(index)
        elif (self.dir / SINGLE).exists():
            path = self.confined(SINGLE, "checkpoint file")
            self.weight_map = dict.fromkeys(_shard_keys(path), SINGLE)
        else:
            raise ValueError(error_message(
                "checkpoint", str(self.dir), f"holds neither {SINGLE} nor {INDEX}",
                "point at a directory written by save_pretrained (safetensors)"))
        for shard in sorted(set(self.weight_map.values())):
            self.confined(shard, f"index entry (in {INDEX})", must_exist=False)
        self.bytes_read = 0

    def confined(self, relative: object, what: str, *, must_exist: bool = True) -> Path:
        """``relative`` resolved inside the checkpoint directory, refused unless it stays in
        ``root`` and is a regular file (a missing one passes with ``must_exist=False``)."""
        def refuse(rule: str, fix: str) -> ValueError:
            return ValueError(error_message(what, repr(relative), rule, fix))

        if not isinstance(relative, str) or not relative or Path(relative).is_absolute():
            raise refuse("must be a relative file name inside the checkpoint directory",
                         "the index is malformed or hostile: download the checkpoint again")
        path = self.dir / relative
        resolved = path.resolve()
        if not resolved.is_relative_to(self.root):
            raise refuse(f"resolves to {resolved}, outside {self.root} (no file outside the "
                         "checkpoint is ever read)",
                         "the index or a symlink points out of the checkpoint: download it "
                         "again (for a Hugging Face cache snapshot pass root=<its model folder>)")
        if not resolved.exists():
            if must_exist:
                raise refuse("does not exist", "download the checkpoint again")
            return resolved
        if not stat.S_ISREG(resolved.stat().st_mode):
            raise refuse("is not a regular file (a FIFO, device or directory is never opened)",
                         "replace it with the real safetensors file")
        return resolved

    def _read_index(self, index: Path) -> dict[str, str]:
        path = self.confined(INDEX, "checkpoint file")
        try:
            weight_map = json.loads(path.read_text())["weight_map"]
        except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as exc:
            raise ValueError(error_message(
                "index", str(path), f"is not a valid safetensors index ({type(exc).__name__}: "
                f"{exc})", "it needs a JSON object with a 'weight_map' {tensor: shard}: "
                "download it again")) from exc
        if not isinstance(weight_map, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
            raise ValueError(error_message(
                "index", str(path), "its 'weight_map' must map tensor names to shard file names",
                "download the checkpoint again"))
        return weight_map

    def config(self):
        """The model's transformers config (config.json with transformers' defaults filled)."""
        from transformers import AutoConfig

        path = self.confined("config.json", "checkpoint file")
        try:
            alias = CONFIG_ALIASES.get(_model_type(path))
            if alias is not None:  # e.g. Kimi K2's "kimi_k2": a DeepSeek-V3 config
                from transformers import CONFIG_MAPPING

                data = json.loads(path.read_text())
                data.pop("model_type", None)
                return CONFIG_MAPPING[alias].from_dict(data)
            return AutoConfig.from_pretrained(path.parent, local_files_only=True)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ValueError(error_message(
                "config", str(path), f"is not a valid transformers config ({type(exc).__name__}:"
                f" {str(exc).splitlines()[0] if str(exc) else ''})",
                "fix or download config.json again")) from exc

    def _shard(self, path: Path):
        """The safetensors file at ``path`` (confined by the caller), opened once per
        Checkpoint (a layer's thousand expert tensors do not reopen their shard each)."""
        from safetensors import safe_open

        handles = self.__dict__.setdefault("_handles", {})
        if path not in handles:
            handles[path] = safe_open(path, "pt")
        return handles[path]

    def has(self, name: str) -> bool:
        return name in self.weight_map

    def _require(self, name: str) -> None:
        if name not in self.weight_map:
            raise ValueError(error_message(
                "tensor", name, f"is not in the checkpoint's index ({len(self.weight_map)} "
                "tensors)", "check the layer index and the model family"))

    def tensor(self, name: str, shape: tuple[int | None, ...] | None = None) -> torch.Tensor:
        """Tensor ``name``, checked to be floating, finite and (if given) of ``shape``
        (``None``: any size in that dimension), before any caller uses it."""
        from safetensors import SafetensorError

        self._require(name)
        path = self.dir / self.weight_map[name]
        if not path.exists():
            raise ValueError(error_message(
                "shard", str(path), f"is missing (it holds tensor {name})",
                "download the checkpoint again"))
        path = self.confined(self.weight_map[name], "shard")
        try:
            t = self._shard(path).get_tensor(name)
        except (SafetensorError, OSError, RuntimeError) as exc:
            raise ValueError(error_message(
                "shard", str(path), f"cannot be read for tensor {name}: {exc}",
                "the file is corrupt or truncated: download it again")) from exc
        _check_loaded(path, name, t, shape)
        self.bytes_read += t.numel() * t.element_size()
        return t


    def tensor_shape(self, name: str) -> tuple[int, ...]:
        """The shape of tensor ``name`` from its shard's header (no data read)."""
        from safetensors import SafetensorError

        self._require(name)
        path = self.confined(self.weight_map[name], "shard")
        try:
            return tuple(self._shard(path).get_slice(name).get_shape())
        except (SafetensorError, OSError, RuntimeError) as exc:
            raise ValueError(error_message(
                "shard", str(path), f"cannot be read for tensor {name}: {exc}",
                "the file is corrupt or truncated: download it again")) from exc

    def tensor_row(self, name: str, index: int, shape: tuple[int | None, ...], *,
                   packed: bool = False) -> torch.Tensor:
        """Row ``index`` of tensor ``name`` (one expert of a fused [E, ...] tensor): only that
        row is read; the whole tensor must be ``shape`` ([E, ...]), the row is checked like
        ``tensor``'s (floating, finite; ``packed``: uint8 instead, e.g. MXFP4 blocks and
        scales)."""
        from safetensors import SafetensorError

        self._require(name)
        path = self.confined(self.weight_map[name], "shard")
        try:
            part = self._shard(path).get_slice(name)
            full = tuple(part.get_shape())
            if not (len(full) == len(shape) and all(
                    w is None or g == w for g, w in zip(full, shape, strict=True))):
                want = "[" + ", ".join("*" if d is None else str(d) for d in shape) + "]"
                raise ValueError(error_message(
                    f"{path.name}: {name}.shape", list(full), f"must be {want} (from "
                    "config.json)", "the checkpoint does not match its config.json: "
                    "download it again or fix the config"))
            if isinstance(index, bool) or not isinstance(index, int) or not (
                    0 <= index < full[0]):
                raise ValueError(error_message(
                    "index", repr(index), f"must be a row of {name} [0, "
                    f"{full[0]})", "pass an expert id of this checkpoint"))
            t = part[index:index + 1][0]
        except (SafetensorError, OSError, RuntimeError) as exc:
            raise ValueError(error_message(
                "shard", str(path), f"cannot be read for tensor {name}: {exc}",
                "the file is corrupt or truncated: download it again")) from exc
        _check_loaded(path, f"{name}[{index}]", t, None, packed=packed)
        self.bytes_read += t.numel() * t.element_size()
        return t


def _model_type(path: Path) -> object:
    """config.json's model_type (None where the file is not a JSON object)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    return data.get("model_type") if isinstance(data, dict) else None


def _shard_keys(path: Path) -> list[str]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, "pt") as f:
            return list(f.keys())
    except (SafetensorError, OSError, RuntimeError) as exc:
        raise ValueError(error_message(
            "checkpoint file", str(path), f"is not a readable safetensors file: {exc}",
            "the file is corrupt or truncated: download it again")) from exc


def _check_loaded(path: Path, name: str, t: torch.Tensor, shape, *, packed: bool = False
                  ) -> None:
    """A loaded tensor is floating (``packed``: uint8), of the expected shape and finite; else
    a ValueError naming the file, the tensor, what was expected and what was found."""
    def refuse(field: str, found: object, rule: str) -> ValueError:
        return ValueError(error_message(
            f"{path.name}: {name}.{field}", found, rule,
            "the checkpoint does not match its config.json: download it again or fix the config"))

    if packed:
        if t.dtype != torch.uint8:
            raise refuse("dtype", t.dtype, "must be uint8 (packed MXFP4 blocks / E8M0 scales)")
    elif not t.is_floating_point():
        raise refuse("dtype", t.dtype, "must be a floating dtype (float32, bfloat16, ...)")
    if shape is not None and not (t.dim() == len(shape) and all(
            want is None or got == want for got, want in zip(t.shape, shape, strict=True))):
        want = "[" + ", ".join("*" if s is None else str(s) for s in shape) + "]"
        raise refuse("shape", list(t.shape), f"must be {want} (from config.json)")
    v = t.float() if t.dtype in FP8_DTYPES else t  # (no isfinite for float8 types)
    if t.numel() and not bool(torch.isfinite(v).all()):
        bad = v[~torch.isfinite(v)][0].item()
        raise refuse("values", f"contains {bad}", "weights must be finite")


@dataclass(frozen=True, kw_only=True, eq=False)
class MoELayerWeights:
    """One MoE layer on one rank: router, this rank's routed experts, shared experts."""

    router: RouterConfig
    hidden_size: int
    intermediate_size: int
    gate: torch.Tensor  # [E, H]
    e_score_correction_bias: torch.Tensor | None  # [E] (DeepSeek-V3)
    w13: torch.Tensor | BlockFP8Weight | MXFP4Tensor  # [e, 2I, H] this rank's experts, gate
    w2: torch.Tensor | BlockFP8Weight | MXFP4Tensor  # then up rows; [e, H, I]; FP8 / MXFP4
    #                                                  checkpoints: in their format
    shared_w13: torch.Tensor | None = None  # [2Is, H]
    shared_w2: torch.Tensor | None = None  # [H, Is]
    shared_gate: torch.Tensor | None = None  # [1, H] (Qwen2-MoE)
    gate_bias: torch.Tensor | None = None  # [E] the router linear's bias (gpt-oss)
    expert_variant: ExpertVariant = PLAIN  # what the routed experts compute (families.py)
    w13_bias: torch.Tensor | None = None  # [e, 2I] (gpt-oss), gate then up like w13
    w2_bias: torch.Tensor | None = None  # [e, H]

    @property
    def fp8(self) -> bool:
        """The routed experts are FP8 with 128x128 block scales (an FP8 checkpoint)."""
        return isinstance(self.w13, BlockFP8Weight)

    @property
    def mxfp4(self) -> bool:
        """The routed experts are MXFP4 (gpt-oss's checkpoints; ``formats.mxfp4``)."""
        return isinstance(self.w13, MXFP4Tensor)

    @property
    def expert_bytes(self) -> int:
        """Bytes of this rank's routed experts (FP8: weights plus float32 block scales; MXFP4:
        packed values plus E8M0 scales)."""
        return sum(w.nbytes if isinstance(w, (BlockFP8Weight, MXFP4Tensor))
                   else w.numel() * w.element_size() for w in (self.w13, self.w2))

    @property
    def nbytes(self) -> int:
        return self.expert_bytes + sum(t.numel() * t.element_size() for t in (
            self.gate, self.e_score_correction_bias, self.shared_w13, self.shared_w2,
            self.shared_gate, self.gate_bias, self.w13_bias, self.w2_bias) if t is not None)


def _family(model_type: str) -> ModelFamily:
    return family(model_type, fix="load other models through weights_from_block")


SCALE_SUFFIX = "_scale_inv"  # FP8 checkpoints: <proj>.weight_scale_inv beside <proj>.weight


def _read_expert(ck: Checkpoint, names: ExpertTensors, H: int, I: int | None = None) -> tuple:
    """(w13 [2I, H]: gate rows then up rows, w2 [H, I]) of the expert whose tensors are
    ``names``, each checked against the config's H and I (``I=None``: the gate's rows); FP8
    tensors dequantised to float32 (shared experts, checks)."""
    if ck.has(names.gate + SCALE_SUFFIX):
        w13, w2 = _read_expert_fp8(ck, names, H, I)
        return w13.dequantize(torch.float32), w2.dequantize(torch.float32)
    gate = ck.tensor(names.gate, (I, H))
    I = gate.shape[0]
    up, down = ck.tensor(names.up, (I, H)), ck.tensor(names.down, (H, I))
    for name, t in zip((names.gate, names.up, names.down), (gate, up, down), strict=True):
        if t.dtype in FP8_DTYPES:  # an FP8 weight without its scales is no value at all
            raise ValueError(error_message(
                f"{name}.dtype", t.dtype, f"an FP8 weight needs its block scales "
                f"{name + SCALE_SUFFIX} beside it, and the checkpoint has none",
                "download the checkpoint again (every FP8 projection has a weight_scale_inv)"))
    return torch.cat([gate, up]), down


_read_fp8 = read_block_fp8  # an FP8 projection with its block scales (formats.block_fp8)


def _read_expert_fp8(ck: Checkpoint, names: ExpertTensors, H: int, I: int | None = None
                     ) -> tuple[BlockFP8Weight, BlockFP8Weight]:
    """The FP8 expert ``names``: (w13 [2I, H], w2 [H, I]) block-scaled, not dequantised."""
    gate = _read_fp8(ck, names.gate, (I, H))
    I = gate.shape[0]
    up = _read_fp8(ck, names.up, (I, H))
    w13 = BlockFP8Weight(torch.cat([gate.weight, up.weight]),
                         torch.cat([gate.scale_inv, up.scale_inv]))
    return w13, _read_fp8(ck, names.down, (H, I))


def fused_to_local(gate_up_HJ: torch.Tensor, down_IH: torch.Tensor, *, interleaved: bool,
                   gate_up_bias: torch.Tensor | None = None) -> tuple:
    """One expert of a fused family in rocm_moe's layout: gate_up [H, 2I] (columns gate then
    up, or alternating gate, up where ``interleaved``), down [I, H] -> (w13 [2I, H] gate rows
    then up rows, w2 [H, I], w13_bias [2I] or None)."""
    w13 = gate_up_HJ.T
    b13 = gate_up_bias
    if interleaved:
        w13 = torch.cat([w13[0::2], w13[1::2]])
        b13 = None if b13 is None else torch.cat([b13[0::2], b13[1::2]])
    return w13.contiguous(), down_IH.T.contiguous(), b13


def _read_fused_expert(ck: Checkpoint, fam: ModelFamily, names: FusedExpertTensors, e: int,
                       E: int, H: int, I: int) -> tuple:
    """Expert ``e`` of a fused family: (w13 [2I, H], w2 [H, I]) and, with biases, (w13_bias
    [2I], w2_bias [H]); only row e of each fused tensor is read. The tensors may be [E, H, 2I]
    / [E, I, H] or [E, 2I, H] / [E, H, I] (their shapes tell; the family's layout where
    2I == H)."""
    hidden_first = fam.fused_hidden_first if 2 * I == H else \
        ck.tensor_shape(names.gate_up) == (E, H, 2 * I)
    if hidden_first:
        gate_up = ck.tensor_row(names.gate_up, e, (E, H, 2 * I))
        down = ck.tensor_row(names.down, e, (E, I, H))
    else:
        gate_up = ck.tensor_row(names.gate_up, e, (E, 2 * I, H)).T
        down = ck.tensor_row(names.down, e, (E, H, I)).T
    b13 = None if names.gate_up_bias is None else ck.tensor_row(names.gate_up_bias, e, (E, 2 * I))
    w13, w2, b13 = fused_to_local(gate_up, down, interleaved=fam.interleaved_gate_up,
                                  gate_up_bias=b13)
    if names.down_bias is None:
        return w13, w2
    return w13, w2, b13, ck.tensor_row(names.down_bias, e, (E, H))


@dataclass(frozen=True)
class _Shape:
    """What config.json says a layer's tensors must be."""

    router: RouterConfig
    hidden_size: int
    intermediate_size: int


def _shape(ck: Checkpoint, cfg, fam: ModelFamily) -> _Shape:
    check_activation(fam.text(cfg), where=f"the checkpoint {ck.dir}")
    fam.check_config(cfg, where=f"the checkpoint {ck.dir}")
    try:
        router = RouterConfig.from_hf_config(cfg)
        H, I = fam.hidden_size(cfg), fam.intermediate_size(cfg)
    except (AttributeError, TypeError, ValueError) as exc:
        raise ValueError(error_message(
            "config", str(ck.dir / "config.json"), f"does not describe a {fam.name} MoE model "
            f"({exc})", "fix or download config.json again")) from exc
    for field, value in (("hidden_size", H), (fam.intermediate_size_key, I)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(error_message(
                f"config.json {field}", repr(value), "must be an int >= 1",
                "fix or download config.json again"))
    return _Shape(router=router, hidden_size=H, intermediate_size=I)


def load_moe_layer(directory: str | Path, layer: int, placement: Placement, rank: int,
                   *, checkpoint: Checkpoint | None = None) -> MoELayerWeights:
    """Read layer ``layer``'s MoE weights for ``rank``: its experts only. Every tensor is
    checked (floating, finite, shaped as config.json says) before use."""
    require_placement(placement)
    if checkpoint is not None and not isinstance(checkpoint, Checkpoint):
        raise TypeError(error_message("checkpoint", type(checkpoint).__name__, "must be a "
                                      "Checkpoint or None", "pass Checkpoint(directory)"))
    check_integer_value("layer", layer, minimum=0, fix="pass the layer index as an int")
    ck = checkpoint or Checkpoint(directory)
    cfg = ck.config()
    fam = _family(cfg.model_type)
    shape = _shape(ck, cfg, fam)
    E, H, I = shape.router.num_experts, shape.hidden_size, shape.intermediate_size
    if placement.num_experts != shape.router.routed_experts:  # (rows would be skipped or
        raise ValueError(error_message(                       # read as other experts)
            "placement.num_experts", placement.num_experts, f"must be the checkpoint's "
            f"{shape.router.routed_experts} routed experts", "build the placement from the "
            f"checkpoint's config: Placement.contiguous({shape.router.routed_experts}, W)"))
    gate = fam.gate_weight(layer)
    if not ck.has(gate):
        raise ValueError(error_message(
            "layer", layer, f"has no MoE block in this checkpoint ({gate})",
            "pick a sparse layer (DeepSeek-V3's first layers are dense)"))
    local = list(placement.local_experts(rank))
    if fam.fused_experts:
        return _load_fused_layer(ck, cfg, fam, shape, layer, local)
    fp8 = bool(local) and ck.has(fam.expert_tensors(layer, local[0]).gate + SCALE_SUFFIX)
    if fp8 and I % 128:
        raise ValueError(error_message(
            f"config.json {fam.intermediate_size_key}", I, "an FP8 checkpoint's experts need "
            "I % 128 == 0 (the up rows start on a 128-row scale block)",
            "dequantise the checkpoint to bfloat16"))
    read = _read_expert_fp8 if fp8 else _read_expert
    experts = [read(ck, fam.expert_tensors(layer, e), H, I) for e in local]
    kw = _shared_kwargs(ck, fam, layer, H)
    bias = fam.router_bias_tensor(layer)
    return MoELayerWeights(
        router=shape.router, hidden_size=H, intermediate_size=I, gate=ck.tensor(gate, (E, H)),
        e_score_correction_bias=_router_bias(ck, bias, E),
        w13=_stack([w13 for w13, _ in experts]), w2=_stack([w2 for _, w2 in experts]), **kw)


def _router_bias(ck: Checkpoint, name: str | None, E: int) -> torch.Tensor | None:
    """The router's [E] choice bias (ERNIE 4.5 stores it as [1, E]), or None without one."""
    if name is None or not ck.has(name):
        return None
    t = ck.tensor(name, (None,) * (2 if len(ck.tensor_shape(name)) == 2 else 1))
    if tuple(t.shape) not in ((E,), (1, E)):
        raise ValueError(error_message(
            f"{name}.shape", list(t.shape), f"must be [{E}] or [1, {E}] (from config.json)",
            "the checkpoint does not match its config.json: download it again or fix the config"))
    return t.reshape(E)


def _shared_kwargs(ck: Checkpoint, fam: ModelFamily, layer: int, H: int) -> dict:
    """The shared experts (and their sigmoid gate) of the layer, as MoELayerWeights fields."""
    kw = {}
    if (shared := fam.shared_expert_tensors(layer)) is not None:
        kw = dict(zip(("shared_w13", "shared_w2"), _read_expert(ck, shared, H), strict=True))
        shared_gate = fam.shared_expert_gate_weight(layer)
        if shared_gate is not None and ck.has(shared_gate):
            kw["shared_gate"] = ck.tensor(shared_gate, (1, H))
    return kw


def _load_fused_layer(ck: Checkpoint, cfg, fam: ModelFamily, shape: _Shape, layer: int,
                      local: list[int]) -> MoELayerWeights:
    """``load_moe_layer`` for a family with fused expert tensors (gpt-oss, Llama 4)."""
    E, H, I = shape.router.num_experts, shape.hidden_size, shape.intermediate_size
    names = fam.fused_expert_tensors(layer)
    if MXFP4Weights.in_checkpoint(ck, names):
        return _load_mxfp4_layer(ck, cfg, fam, shape, layer, local)
    experts = [_read_fused_expert(ck, fam, names, e, E, H, I) for e in local]
    if not experts:  # a rank without experts still holds [0, ...] tensors
        experts = [(torch.empty(0, 2 * I, H), torch.empty(0, H, I), torch.empty(0, 2 * I),
                    torch.empty(0, H))]
        stack = torch.cat
    else:
        stack = torch.stack
    bias_kw = {}
    if fam.expert_bias:
        bias_kw = dict(w13_bias=stack([x[2] for x in experts]),
                       w2_bias=stack([x[3] for x in experts]))
    gate_bias = fam.gate_bias_tensor(layer)
    router_bias = fam.router_bias_tensor(layer)
    return MoELayerWeights(
        router=shape.router, hidden_size=H, intermediate_size=I,
        gate=ck.tensor(fam.gate_weight(layer), (E, H)),
        e_score_correction_bias=_router_bias(ck, router_bias, E),
        gate_bias=None if gate_bias is None else ck.tensor(gate_bias, (E,)),
        w13=stack([x[0] for x in experts]), w2=stack([x[1] for x in experts]),
        expert_variant=fam.expert_variant(cfg), **bias_kw,
        **_shared_kwargs(ck, fam, layer, H))


def _fused_biases(ck: Checkpoint, fam: ModelFamily, names: FusedExpertTensors, e: int, E: int,
                  H: int, I: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Expert ``e``'s (w13_bias [2I] gate then up, w2_bias [H]) of a fused family."""
    b13 = ck.tensor_row(names.gate_up_bias, e, (E, 2 * I))
    if fam.interleaved_gate_up:
        b13 = deinterleave_rows(b13[:, None])[:, 0]
    return b13, ck.tensor_row(names.down_bias, e, (E, H))


def _load_mxfp4_layer(ck: Checkpoint, cfg, fam: ModelFamily, shape: _Shape, layer: int,
                      local: list[int]) -> MoELayerWeights:
    """``load_moe_layer`` of an MXFP4 checkpoint (gpt-oss's ``experts.*_proj_blocks`` and
    ``_scales``): this rank's experts read in MXFP4 (``formats.mxfp4``: only their rows, gate
    and up de-interleaved, never dequantised), their biases, the router."""
    E, H, I = shape.router.num_experts, shape.hidden_size, shape.intermediate_size
    names = fam.fused_expert_tensors(layer)
    weights = MXFP4Weights.from_checkpoint(
        ck, [FusedExpert(names, e, E) for e in local], hidden_size=H, intermediate_size=I,
        interleaved=fam.interleaved_gate_up)
    bias_kw = {}
    if fam.expert_bias:
        biases = [_fused_biases(ck, fam, names, e, E, H, I) for e in local]
        bias_kw = dict(w13_bias=torch.stack([b[0] for b in biases]) if biases
                       else torch.empty(0, 2 * I),
                       w2_bias=torch.stack([b[1] for b in biases]) if biases
                       else torch.empty(0, H))
    gate_bias = fam.gate_bias_tensor(layer)
    return MoELayerWeights(
        router=shape.router, hidden_size=H, intermediate_size=I,
        gate=ck.tensor(fam.gate_weight(layer), (E, H)),
        e_score_correction_bias=_router_bias(ck, fam.router_bias_tensor(layer), E),
        gate_bias=None if gate_bias is None else ck.tensor(gate_bias, (E,)),
        w13=weights.w13, w2=weights.w2, expert_variant=fam.expert_variant(cfg), **bias_kw,
        **_shared_kwargs(ck, fam, layer, H))


def is_fp8_layer(directory: str | Path, layer: int) -> bool:
    """Layer ``layer``'s routed experts are FP8 with block scales (expert 0's gate has a
    ``weight_scale_inv``): what ``load_moe_layer`` will read, known before any rank starts."""
    ck = Checkpoint(directory)
    fam = _family(ck.config().model_type)
    if fam.fused_experts:  # (their quantised formats are read elsewhere, later)
        return False
    return ck.has(fam.expert_tensors(layer, 0).gate + SCALE_SUFFIX)


def _stack(ws: list) -> torch.Tensor | BlockFP8Weight:
    if ws and isinstance(ws[0], BlockFP8Weight):
        return BlockFP8Weight(torch.stack([w.weight for w in ws]),
                              torch.stack([w.scale_inv for w in ws]))
    return torch.stack(ws)


def expert_reader(directory: str | Path, layer: int) -> Callable[[int], tuple]:
    """``g -> (w13 [2I, H], w2 [H, I])`` read from the checkpoint on demand (for checks)."""
    ck = Checkpoint(directory)
    cfg = ck.config()
    fam = _family(cfg.model_type)
    shape = _shape(ck, cfg, fam)

    def read(g: int):
        if fam.fused_experts:
            names = fam.fused_expert_tensors(layer)
            E, H, I = shape.router.num_experts, shape.hidden_size, shape.intermediate_size
            if MXFP4Weights.in_checkpoint(ck, names):  # dequantised (float32 is exact)
                w13, w2 = MXFP4Weights.from_checkpoint(
                    ck, [FusedExpert(names, g, E)], hidden_size=H, intermediate_size=I,
                    interleaved=fam.interleaved_gate_up).dequantize(torch.float32)
                biases = _fused_biases(ck, fam, names, g, E, H, I) if fam.expert_bias else ()
                return (w13[0], w2[0], *biases)
            return _read_fused_expert(ck, fam, names, g, E, H, I)
        return _read_expert(ck, fam.expert_tensors(layer, g), shape.hidden_size,
                            shape.intermediate_size)
    return read


def weights_from_block(block: nn.Module, config, placement: Placement,
                       rank: int) -> MoELayerWeights:
    """The same from a transformers 5 MoE block (fused expert tensors), this rank's slice."""
    fam = _family(config.model_type)
    config = fam.text(config)
    check_activation(config, where="replace_moe_blocks")
    ex = block.experts
    E = ex.down_proj.shape[0]
    zero = fam.zero_experts(config)
    if ex.gate_up_proj.shape[0] not in (E, E + zero):  # (transformers 5.17's LongCat-Flash
        raise ValueError(error_message(                 # holds unused rows for its zero experts)
            "experts.gate_up_proj.shape[0]", ex.gate_up_proj.shape[0],
            f"must be down_proj's expert count E={E}"
            + (f" or E + zero_expert_num = {E + zero}" if zero else ""),
            "pass a block whose two expert tensors hold the same experts"))
    if placement.num_experts != E:
        raise ValueError(error_message(
            "dispatcher.placement.num_experts", placement.num_experts,
            f"must be the block's expert count E={E}", "build the dispatcher from the model's "
            "config (its placement over E experts)"))
    local = list(placement.local_experts(rank))
    shared = getattr(block, "shared_experts", None) or getattr(block, "shared_expert", None)
    kw = {}
    if shared is not None:
        kw = dict(shared_w13=torch.cat([shared.gate_proj.weight, shared.up_proj.weight]).detach(),
                  shared_w2=shared.down_proj.weight.detach())
        if getattr(block, "shared_expert_gate", None) is not None:
            kw["shared_gate"] = block.shared_expert_gate.weight.detach()
    fam.check_config(config, where="replace_moe_blocks")
    router = block.get_submodule(fam.router)  # (LongCat-Flash: router.classifier)
    bias = getattr(router, "e_score_correction_bias", None)
    if bias is None and hasattr(router, "moe_statics"):  # ERNIE 4.5: [1, E]
        bias = router.moe_statics.e_score_correction_bias.reshape(-1)
    if bias is None and fam.router_bias is not None:  # LongCat-Flash: beside the linear
        bias = attrgetter(fam.router_bias)(block)
    if fam.fused_experts and fam.fused_hidden_first:  # [E, H, 2I] / [E, I, H] (gpt-oss, ...)
        experts = [fused_to_local(ex.gate_up_proj[e].detach(), ex.down_proj[e].detach(),
                                  interleaved=fam.interleaved_gate_up,
                                  gate_up_bias=ex.gate_up_proj_bias[e].detach()
                                  if fam.expert_bias else None) for e in local]
        I = ex.down_proj.shape[1]
        w13 = torch.stack([x[0] for x in experts]) if experts else ex.gate_up_proj[:0].mT
        w2 = torch.stack([x[1] for x in experts]) if experts else ex.down_proj[:0].mT
        if fam.expert_bias:
            kw.update(w13_bias=torch.stack([x[2] for x in experts]) if experts
                      else ex.gate_up_proj_bias[:0].detach(),
                      w2_bias=ex.down_proj_bias.detach()[local])
    else:
        I = ex.down_proj.shape[-1]
        w13, w2 = ex.gate_up_proj.detach()[local], ex.down_proj.detach()[local]
    return MoELayerWeights(
        router=RouterConfig.from_hf_config(config), hidden_size=config.hidden_size,
        intermediate_size=I, gate=router.weight.detach(),
        e_score_correction_bias=None if bias is None else bias.detach(),
        gate_bias=router.bias.detach() if fam.gate_bias else None,
        expert_variant=_as_computed_by(ex, fam.expert_variant(config)), w13=w13, w2=w2, **kw)


def _as_computed_by(module, variant: ExpertVariant) -> ExpertVariant:
    """``variant`` with the activation constants ``module`` itself computes with: transformers
    5.17's GptOssExperts hard-codes alpha = 1.702 and limit = 7.0 and ignores the config's
    swiglu_limit (5.25 reads it), so a block's own ``alpha`` / ``limit`` win over its config."""
    if variant.activation != "swiglu_oai":
        return variant
    kw = {k: float(getattr(module, k)) for k in ("alpha", "limit")
          if isinstance(getattr(module, k, None), (int, float))}
    return replace(variant, **kw) if kw else variant


def build_layer(weights: MoELayerWeights, *, dispatcher: Dispatcher | None = None,
                experts: Experts | None = None, weight_mode: str = "experts",
                dtype: torch.dtype | None = None, device=None,
                invariant: bool = False) -> EPMoE:
    """An EPMoE holding ``weights`` (its dispatcher's rank must be the weights' rank)."""
    if weights.mxfp4:
        return _build_mxfp4_layer(weights, dispatcher=dispatcher, experts=experts,
                                  weight_mode=weight_mode, dtype=dtype, device=device,
                                  invariant=invariant)
    if weights.fp8:
        if weights.expert_variant != PLAIN:
            raise ValueError(error_message(
                "expert_variant", weights.expert_variant, "FP8 block-scale experts run plain "
                "SwiGLU only", "dequantise the checkpoint to bfloat16"))
        return _build_fp8_layer(weights, dispatcher=dispatcher, experts=experts,
                                weight_mode=weight_mode, dtype=dtype or torch.bfloat16,
                                device=device, invariant=invariant)
    dtype = dtype or weights.w13.dtype
    layer = EPMoE(hidden_size=weights.hidden_size, intermediate_size=weights.intermediate_size,
                  router=weights.router, dispatcher=dispatcher, experts=experts,
                  weight_mode=weight_mode,
                  shared_intermediate_size=None if weights.shared_w2 is None
                  else weights.shared_w2.shape[1],
                  shared_expert_gate=weights.shared_gate is not None, dtype=dtype,
                  device=device, invariant=invariant, expert_variant=weights.expert_variant)
    _copy_weights(layer, weights)
    return layer


@torch.no_grad()
def _copy_weights(layer, weights: MoELayerWeights) -> None:
    """The checkpoint's router, experts (this rank's) and shared experts into ``layer``."""
    layer.gate.weight.copy_(weights.gate)
    if weights.gate_bias is not None:
        layer.gate.bias.copy_(weights.gate_bias)
    if weights.w13_bias is not None:  # (this rank's experts: the loader read only those)
        check_finite("w13_bias", weights.w13_bias, "load the experts' biases again")
        check_finite("w2_bias", weights.w2_bias, "load the experts' biases again")
        layer.w13_bias.copy_(weights.w13_bias)
        layer.w2_bias.copy_(weights.w2_bias)
    if weights.e_score_correction_bias is not None:
        layer.e_score_correction_bias.copy_(weights.e_score_correction_bias)
    layer.load_experts(weights.w13, weights.w2)
    if layer.shared_experts is not None:
        layer.shared_experts.w13.copy_(weights.shared_w13)
        layer.shared_experts.w2.copy_(weights.shared_w2)
        if weights.shared_gate is not None:
            layer.shared_experts.gate.weight.copy_(weights.shared_gate)


def _build_fp8_layer(weights: MoELayerWeights, *, experts, dtype, device, **kw):
    """An EPMoE of the block-FP8 weight format (``formats.block_fp8``) holding an FP8
    checkpoint's experts in the device's FP8 encoding (e4m3fnuz on MI300: converted with the
    scale adjustment); ``experts``: an FP8 backend, or the float backend of the same name
    ("reference", "triton", "aiter")."""
    from rocm_moe.experts.fp8 import FP8ReferenceExperts, fp8_sibling
    from rocm_moe.quant import native_fp8_dtype

    fp8_experts = FP8ReferenceExperts() if experts is None else fp8_sibling(experts)
    if fp8_experts is None:
        raise ValueError(error_message(
            "experts", experts.name, "has no FP8 block-scale path here (an FP8 checkpoint)",
            "pick --experts reference, triton or aiter"))
    layer = EPMoE(hidden_size=weights.hidden_size,
                  intermediate_size=weights.intermediate_size, router=weights.router,
                  experts=fp8_experts, weight_format="block_fp8",
                  format_options={"fp8_dtype": native_fp8_dtype(device)},
                  shared_intermediate_size=None if weights.shared_w2 is None
                  else weights.shared_w2.shape[1],
                  shared_expert_gate=weights.shared_gate is not None, dtype=dtype,
                  device=device, **kw)
    _copy_weights(layer, weights)
    return layer


def _build_mxfp4_layer(weights: MoELayerWeights, *, experts, dtype, device, **kw):
    """An EPMoE of the MXFP4 weight format (``formats.mxfp4``) holding an MXFP4 checkpoint's
    experts as read (never dequantised); ``experts``: an MXFP4 backend, or the float backend
    of the same name ("reference", "triton": ``experts.mxfp4.mxfp4_sibling``)."""
    from rocm_moe.experts.mxfp4 import mxfp4_sibling

    mx_experts = mxfp4_sibling(experts)
    if mx_experts is None:
        raise ValueError(error_message(
            "experts", experts.name, "has no MXFP4 path (an MXFP4 checkpoint)",
            "pick --experts reference or triton"))
    layer = EPMoE(hidden_size=weights.hidden_size, intermediate_size=weights.intermediate_size,
                  router=weights.router, experts=mx_experts, weight_format="mxfp4",
                  shared_intermediate_size=None if weights.shared_w2 is None
                  else weights.shared_w2.shape[1],
                  shared_expert_gate=weights.shared_gate is not None,
                  dtype=dtype or torch.bfloat16, device=device,
                  expert_variant=weights.expert_variant, **kw)
    _copy_weights(layer, weights)
    return layer


# ---- transformers integration -------------------------------------------------------------------
IMPLEMENTATION = "rocm_moe"


@dataclass(frozen=True, eq=False)
class ExpertsFunction:
    """transformers' experts call, bound to a rocm_moe experts backend: ``(module,
    hidden_states [T, H], top_k_index [T, K], top_k_weights [T, K]) -> [T, H]``, weighted.
    ``register`` puts one in transformers' registry of experts implementations."""

    experts: Experts

    def __call__(self, module, hidden_states, top_k_index, top_k_weights):
        E = module.gate_up_proj.shape[0]
        emap = getattr(module, "_rocm_moe_map", None)
        if emap is None:  # the module's first call: what its experts compute must be ours
            _check_experts_module(module)
        if emap is None or emap.map_E.device != hidden_states.device:
            emap = Placement.contiguous(E, 1).expert_map(0).to(hidden_states.device)
            module._rocm_moe_map = emap
        w13, w2, kw = _module_weights(module)
        out = self.experts(hidden_states, top_k_index.to(torch.int32), top_k_weights.float(),
                           w13, w2, emap, weight_mode="experts", validate=False, **kw)
        return out.out


def _module_variant(module) -> ExpertVariant:
    """The variant of a transformers experts module: its family's (gpt-oss: from its config),
    PLAIN for a module without a config of a known family."""
    config = getattr(module, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type is None:
        return PLAIN
    try:
        fam = family(model_type)
    except ValueError:
        return PLAIN
    return _as_computed_by(module, fam.expert_variant(config))


def _check_experts_module(module) -> None:
    """A ValueError unless rocm_moe computes what ``module`` does: SwiGLU with SiLU (or its
    family's variant, gpt-oss's clamped one), a gate, no norm after each expert, biases only
    where its family has them."""
    name = type(module).__name__
    variant = _module_variant(module)
    act = getattr(module, "act_fn", None)
    if variant.activation == "silu" and act is not None and not isinstance(act, nn.SiLU) \
            and type(act).__name__ != "SiLUActivation":
        raise ValueError(error_message(
            f"{name}.act_fn", type(act).__name__, "rocm_moe experts are SwiGLU (silu(gate) * up)",
            'use experts_implementation="eager" for models whose hidden_act is not silu'))
    for flag, ok in (("has_gate", True), ("has_post_expert_norm", False),
                     ("has_bias", variant.bias)):
        if getattr(module, flag, ok) != ok:
            raise ValueError(error_message(
                f"{name}.{flag}", getattr(module, flag), f"rocm_moe's experts need {flag}={ok} "
                f"here (variant {variant})", 'use experts_implementation="eager" for this model'))


def _module_weights(module) -> tuple:
    """(w13 [E, 2I, H] gate rows then up rows, w2 [E, H, I], variant keywords) of a transformers
    experts module, converted from its transposed / interleaved layout once per weight version
    (kept on the module)."""
    variant = _module_variant(module)
    if not getattr(module, "is_transposed", False) and getattr(module, "is_concatenated", True) \
            and not variant.bias:
        return module.gate_up_proj, module.down_proj, variant_kwargs(variant, None, None)
    tensors = [module.gate_up_proj, module.down_proj]
    if variant.bias:
        tensors += [module.gate_up_proj_bias, module.down_proj_bias]
    key = tuple((t.data_ptr(), t._version, t.device) for t in tensors)
    cached = getattr(module, "_rocm_moe_weights", None)
    if cached is None or cached[0] != key:
        with torch.no_grad():
            gu, down = tensors[0].detach(), tensors[1].detach()
            if module.is_transposed:  # [E, H, 2I] / [E, I, H]
                gu, down = gu.transpose(1, 2), down.transpose(1, 2)
            b13 = tensors[2].detach() if variant.bias else None
            if not getattr(module, "is_concatenated", True):  # gate0, up0, gate1, ...
                gu = torch.cat([gu[:, 0::2], gu[:, 1::2]], dim=1)
                b13 = None if b13 is None else torch.cat([b13[:, 0::2], b13[:, 1::2]], dim=1)
            b2 = tensors[3].detach() if variant.bias else None
            cached = (key, gu.contiguous(), down.contiguous(),
                      variant_kwargs(variant, None if b13 is None else b13.contiguous(), b2))
        module._rocm_moe_weights = cached
    return cached[1], cached[2], cached[3]


def register(experts: Experts | None = None) -> str:
    """Register "rocm_moe" as a transformers experts implementation (idempotent); ``experts``
    picks the backend (default: the one registered before, else the reference). Returns the
    implementation's name."""
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    if experts is not None and not isinstance(experts, Experts):  # (a name failed at forward)
        raise TypeError(error_message("experts", repr(experts), "must be an Experts instance "
                                      "or None", "pass e.g. ReferenceExperts() or "
                                      "rocm_moe.backends.make_experts('triton')"))
    if experts is None:
        current = ALL_EXPERTS_FUNCTIONS.get(IMPLEMENTATION)
        if isinstance(current, ExpertsFunction):
            return IMPLEMENTATION
        experts = ReferenceExperts()
    ALL_EXPERTS_FUNCTIONS.register(IMPLEMENTATION, ExpertsFunction(experts))
    return IMPLEMENTATION


def _is_moe_block(module: nn.Module) -> bool:
    router = getattr(module, "gate", None) or getattr(module, "router", None)
    router = getattr(router, "classifier", router)  # LongCat-Flash's router.classifier
    return hasattr(module, "experts") and hasattr(module.experts, "gate_up_proj") \
        and hasattr(router, "weight")


class TupleOutput(nn.Module):
    """An EPMoE in place of a block that returns (hidden_states, router scores) (gpt-oss, Llama
    4): returns (its output, None); the scores are not recorded."""

    def __init__(self, moe: EPMoE):
        super().__init__()
        self.moe = moe

    def forward(self, hidden_states: torch.Tensor):
        return self.moe(hidden_states), None


def replace_moe_blocks(model: nn.Module, dispatcher_factory: Callable[[], Dispatcher], *,
                       experts: Experts | None = None, weight_mode: str = "experts") -> int:
    """Swap every MoE block of a transformers model for an EPMoE over ``dispatcher_factory()``
    (called once per block, on every rank in the same order). The EPMoE copies the block's
    router, its shared experts and this rank's experts; the block is dropped. Returns how
    many blocks were replaced. Router logits are not recorded for an auxiliary loss."""
    config = model.config
    if not callable(dispatcher_factory):
        raise TypeError(error_message("dispatcher_factory", repr(dispatcher_factory), "must be "
                                      "callable (one call per MoE block)",
                                      "pass e.g. lambda: pool.shared_dispatcher(...)"))
    count = 0
    for name, module in list(model.named_modules()):
        if not _is_moe_block(module):
            continue
        dispatcher = dispatcher_factory()
        if not isinstance(dispatcher, Dispatcher):
            raise TypeError(error_message(
                "dispatcher_factory()", type(dispatcher).__name__, "must return a Dispatcher",
                "pass e.g. lambda: LocalDispatcher(Placement.contiguous(E, 1))"))
        w = weights_from_block(module, config, dispatcher.placement, dispatcher.rank)
        layer = build_layer(w, dispatcher=dispatcher, experts=experts, weight_mode=weight_mode,
                            dtype=w.gate.dtype, device=w.gate.device)
        if _family(config.model_type).block_returns_tuple:  # (out, scores)
            layer = TupleOutput(layer)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, layer)
        count += 1
    return count
