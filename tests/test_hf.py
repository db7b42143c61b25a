"""Real checkpoints and transformers models: tiny random Qwen3-MoE, Qwen2-MoE, Mixtral and
DeepSeek-V3 built from transformers configs and saved with save_pretrained (no downloads)."""

from __future__ import annotations

import shutil

import pytest
import torch

transformers = pytest.importorskip("transformers")

from rocm_moe import LocalDispatcher, Placement, RouterConfig  # noqa: E402
from rocm_moe.cli import main  # noqa: E402
from rocm_moe.comm.torch import TorchDispatcher  # noqa: E402
from rocm_moe.distributed import launch  # noqa: E402
from rocm_moe.integrations import hf  # noqa: E402

COMMON = dict(vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, head_dim=8, num_experts_per_tok=2, tie_word_embeddings=False)


def _configs():
    from transformers import DeepseekV3Config, MixtralConfig, Qwen2MoeConfig, Qwen3MoeConfig

    return {
        "qwen3_moe": Qwen3MoeConfig(**COMMON, intermediate_size=48, moe_intermediate_size=16,
                                    num_experts=8, norm_topk_prob=True, mlp_only_layers=[]),
        "qwen2_moe": Qwen2MoeConfig(**COMMON, intermediate_size=48, moe_intermediate_size=16,
                                    num_experts=8, shared_expert_intermediate_size=24),
        "mixtral": MixtralConfig(**COMMON, intermediate_size=16, num_local_experts=8),
        "deepseek_v3": DeepseekV3Config(
            **{**COMMON, "num_key_value_heads": 4}, intermediate_size=48,
            moe_intermediate_size=16, n_routed_experts=8, n_group=2, topk_group=1,
            first_k_dense_replace=1, q_lora_rank=16, kv_lora_rank=16, qk_rope_head_dim=8,
            qk_nope_head_dim=8, v_head_dim=8, n_shared_experts=1),
    }


FAMILIES = list(_configs())
MOE_LAYER = {"deepseek_v3": 1}  # DeepSeek-V3's first layer is dense here


def _num_experts(cfg):
    return RouterConfig.from_hf_config(cfg).num_experts


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """{family: (sharded dir, single-file dir)} of randomly initialised tiny models."""
    from transformers import AutoModelForCausalLM

    out = {}
    for family, cfg in _configs().items():
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(cfg)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "e_score_correction_bias" not in name:
                    p.normal_(0, 0.2)
        base = tmp_path_factory.mktemp(family)
        model.save_pretrained(base / "sharded", max_shard_size="40KB")
        model.save_pretrained(base / "single")
        out[family] = (base / "sharded", base / "single")
    return out


def _model(path, dtype=torch.float32):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()


@pytest.mark.parametrize("family", FAMILIES)
def test_loader_reads_only_local_experts(checkpoints, family):
    sharded, single = checkpoints[family]
    model = _model(sharded)
    layer = MOE_LAYER.get(family, 0)
    block = model.model.layers[layer].mlp  # on disk Mixtral's is "block_sparse_moe"
    E = _num_experts(model.config)
    for directory in (sharded, single):
        for rank in (0, 1):
            p = Placement.contiguous(E, 2)
            ck = hf.Checkpoint(directory)
            w = hf.load_moe_layer(directory, layer, p, rank, checkpoint=ck)
            local = list(p.local_experts(rank))
            assert torch.equal(w.w13, block.experts.gate_up_proj.detach()[local])
            assert torch.equal(w.w2, block.experts.down_proj.detach()[local])
            assert torch.equal(w.gate, block.gate.weight.detach())
            ex = block.experts
            expert_bytes = (ex.gate_up_proj.numel() + ex.down_proj.numel()) * 4
            assert w.w13.numel() * 4 + w.w2.numel() * 4 == expert_bytes // 2
            assert ck.bytes_read < w.nbytes + expert_bytes // 2 + 1  # the other half never read
            from_block = hf.weights_from_block(block, model.config, p, rank)
            assert torch.equal(from_block.w13, w.w13)
            if w.shared_w13 is not None:
                assert torch.equal(from_block.shared_w13, w.shared_w13)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("family", FAMILIES)
def test_experts_implementation_matches_transformers(checkpoints, family, dtype):
    hf.register()
    model = _model(checkpoints[family][0], dtype)
    ids = torch.randint(0, 96, (2, 9))
    with torch.no_grad():
        ref = model(ids).logits.float()
        model.set_experts_implementation("rocm_moe")
        ours = model(ids).logits.float()
    if dtype == torch.float32:
        torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
    else:
        assert ((ours - ref).norm() / ref.norm()).item() < 2e-2


@pytest.mark.parametrize("family", FAMILIES)
def test_replace_blocks_single_rank(checkpoints, family):
    model = _model(checkpoints[family][0])
    ids = torch.randint(0, 96, (2, 9))
    with torch.no_grad():
        ref = model(ids).logits
        E = _num_experts(model.config)
        n = hf.replace_moe_blocks(model, lambda: LocalDispatcher(Placement.contiguous(E, 1)))
        torch.testing.assert_close(model(ids).logits, ref, atol=1e-5, rtol=1e-5)
    assert n == model.config.num_hidden_layers - MOE_LAYER.get(family, 0)


def _ep_worker(info, directories):
    """Each family's model on these ranks, one after the other (one launch for all)."""
    return {family: _ep_one(info, directory) for family, directory in directories.items()}


def _ep_one(info, directory):
    torch.manual_seed(0)
    model = _model(directory)
    ids = torch.randint(0, 96, (2, 9))  # the same batch on every rank (same seed)
    with torch.no_grad():
        ref = model(ids).logits
        ref_tokens = model.generate(ids, max_new_tokens=6, do_sample=False)
        E = _num_experts(model.config)
        hf.replace_moe_blocks(model, lambda: TorchDispatcher(
            Placement.contiguous(E, info.world_size), hidden_size=model.config.hidden_size,
            top_k=model.config.num_experts_per_tok, dtype=torch.float32))
        ours = model(ids).logits
        tokens = model.generate(ids, max_new_tokens=6, do_sample=False)
    held = sum(p.numel() for n, p in model.named_parameters() if ".w13" in n or ".w2" in n)
    return dict(max_diff=(ours - ref).abs().max().item(), same_tokens=torch.equal(tokens,
                ref_tokens), expert_params=held)


@pytest.fixture(scope="module")
def ep_results(checkpoints):
    """{family: [rank 0's result, rank 1's]}: every family on one launch of 2 gloo ranks
    (spawning ranks that import transformers costs more than the models' runs)."""
    dirs = {family: str(checkpoints[family][0]) for family in FAMILIES}
    results = launch(2, _ep_worker, dirs, backend="gloo", timeout_s=120)
    return {family: [r[family] for r in results] for family in FAMILIES}


@pytest.mark.parametrize("family", FAMILIES)
def test_expert_parallel_two_ranks_logits_and_greedy(ep_results, family):
    results = ep_results[family]
    for r in results:
        assert r["max_diff"] < 1e-5, r
        assert r["same_tokens"], r
    assert results[0]["expert_params"] == results[1]["expert_params"]


def test_missing_and_corrupt_shards(checkpoints, tmp_path):
    src = checkpoints["qwen3_moe"][0]
    broken = tmp_path / "broken"
    shutil.copytree(src, broken)
    ck = hf.Checkpoint(broken)
    name = "model.layers.0.mlp.experts.5.down_proj.weight"
    shard = broken / ck.weight_map[name]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])  # truncated
    with pytest.raises(ValueError, match=rf"{shard.name}.*cannot be read for tensor "):
        hf.load_moe_layer(broken, 0, Placement.contiguous(8, 1), 0)
    shard.unlink()
    with pytest.raises(ValueError, match=rf"{shard.name}.* is missing \(it holds tensor "):
        hf.load_moe_layer(broken, 0, Placement.contiguous(8, 1), 0)
    with pytest.raises(ValueError, match=r"neither model\.safetensors nor"):
        hf.Checkpoint(tmp_path)
    with pytest.raises(ValueError, match="has no MoE block"):
        hf.load_moe_layer(checkpoints["deepseek_v3"][0], 0, Placement.contiguous(8, 1), 0)


def test_run_on_a_checkpoint(checkpoints, capsys):
    rc = main(["run", "--checkpoint", str(checkpoints["deepseek_v3"][0]), "--layer", "1",
               "--tokens", "17", "--iters", "1", "--world-size", "2", "--dtype", "float32"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "E=8 H=32 I=16 K=2" in out
    assert "PASS" in out


def test_old_module_path_is_the_same_module():
    import rocm_moe.hf
    from rocm_moe import hf as old

    assert old is hf
    assert rocm_moe.hf is hf


def test_register_keeps_the_backend_in_transformers_registry():
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    from rocm_moe.experts.reference import ReferenceExperts

    backend = ReferenceExperts()
    assert hf.register(backend) == "rocm_moe"
    assert ALL_EXPERTS_FUNCTIONS["rocm_moe"].experts is backend
    hf.register()  # no backend given: the registered one stays
    assert ALL_EXPERTS_FUNCTIONS["rocm_moe"].experts is backend


# ---- checkpoint trust model: confined to its directory, every tensor checked ---------------
EXPERT5 = "model.layers.0.mlp.experts.5.down_proj.weight"  # qwen3_moe, layer 0, rank 0 of 1


def _copy(checkpoints, tmp_path, kind: int = 0):
    dst = tmp_path / "ck"
    shutil.copytree(checkpoints["qwen3_moe"][kind], dst)
    return dst


def _rewrite_index(directory, name, shard):
    import json

    index = directory / hf.INDEX
    data = json.loads(index.read_text())
    data["weight_map"][name] = shard
    index.write_text(json.dumps(data))


def _load(directory):
    return hf.load_moe_layer(directory, 0, Placement.contiguous(8, 1), 0)


def test_index_entries_outside_the_directory_are_refused(checkpoints, tmp_path):
    import os

    ck = _copy(checkpoints, tmp_path)
    shard = ck / hf.Checkpoint(ck).weight_map[EXPERT5]
    outside = tmp_path / "outside"
    outside.mkdir()
    shutil.copy(shard, outside / "evil.safetensors")
    for entry in ("../outside/evil.safetensors", "/etc/passwd", str(shard)):
        _rewrite_index(ck, EXPERT5, entry)
        with pytest.raises(ValueError, match=r"index entry.*(outside|relative file name)"):
            _load(ck)
    os.symlink(outside / "evil.safetensors", ck / "link.safetensors")  # a symlink out
    _rewrite_index(ck, EXPERT5, "link.safetensors")
    with pytest.raises(ValueError, match=r"'link.safetensors'.*outside"):
        _load(ck)
    os.mkfifo(ck / "fifo.safetensors")  # never opened (opening it would hang)
    _rewrite_index(ck, EXPERT5, "fifo.safetensors")
    with pytest.raises(ValueError, match=r"'fifo.safetensors'.*not a regular file"):
        _load(ck)
    os.symlink(shard.name, ck / "inside.safetensors")  # a symlink inside is fine
    _rewrite_index(ck, EXPERT5, "inside.safetensors")
    assert _load(ck).w2.shape == (8, 32, 16)
    # a symlinked file outside is read where the caller names a root that holds it
    hf.Checkpoint(ck, root=tmp_path)


def _replace_tensor(directory, name, value):
    from safetensors.torch import load_file, save_file

    path = directory / hf.Checkpoint(directory).weight_map[name]
    tensors = load_file(path)
    tensors[name] = value
    save_file(tensors, path, metadata={"format": "pt"})
    return path


@pytest.mark.parametrize(("value", "match"), [
    (torch.zeros(32, 16, dtype=torch.int32), r"down_proj.weight.dtype=torch.int32: must be a "
     "floating dtype"),
    (torch.zeros(32, 16, dtype=torch.bool), r"dtype=torch.bool: must be a floating"),
    (torch.zeros(32, 15), r"down_proj.weight.shape=\[32, 15\]: must be \[32, 16\]"),
    (torch.full((32, 16), float("nan")), r"down_proj.weight.values=contains nan: .*finite"),
], ids=["int32", "bool", "shape", "nan"])
def test_tensors_are_checked_against_the_config(checkpoints, tmp_path, value, match):
    ck = _copy(checkpoints, tmp_path)
    path = _replace_tensor(ck, EXPERT5, value)
    with pytest.raises(ValueError, match=rf"{path.name}: {EXPERT5.replace('.', '[.]')}"):
        _load(ck)
    with pytest.raises(ValueError, match=match):
        _load(ck)


def test_malformed_index_config_and_single_file(checkpoints, tmp_path):
    ck = _copy(checkpoints, tmp_path)
    (ck / hf.INDEX).write_text("{not json")
    with pytest.raises(ValueError, match=rf"index=.*{hf.INDEX}: is not a valid"):
        hf.Checkpoint(ck)
    (ck / hf.INDEX).write_text('{"weight_map": [1, 2]}')
    with pytest.raises(ValueError, match=r"'weight_map' must map tensor names"):
        hf.Checkpoint(ck)
    single = _copy(checkpoints, tmp_path / "s", kind=1)
    (single / "config.json").write_text("{oops")
    with pytest.raises(ValueError, match=r"config=.*config.json: is not a valid"):
        _load(single)
    path = single / hf.SINGLE
    path.write_bytes(path.read_bytes()[:100])  # truncated
    with pytest.raises(ValueError, match=r"model.safetensors: is not a readable safetensors"):
        hf.Checkpoint(single)


def test_run_reports_the_failing_ranks_checkpoint_error(checkpoints, tmp_path, capsys):
    """Rank 1's experts are damaged; rank 0's peers then fail in a collective. The user sees
    rank 1's own error with its Fix:, in one line, not a peer's gloo traceback."""
    ck = _copy(checkpoints, tmp_path)
    _replace_tensor(ck, EXPERT5, torch.full((32, 16), float("nan")))  # expert 5: rank 1 of 2
    rc = main(["run", "--checkpoint", str(ck), "--layer", "0", "--tokens", "5", "--iters", "1",
               "--world-size", "2", "--dtype", "float32"])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert rc == 2, err
    assert err.startswith("rocm-moe run: error: rank 1: "), err
    assert f"{EXPERT5}.values=contains nan" in err, err
    assert "Fix: the checkpoint does not match" in err, err


def test_checkpoint_placement_must_cover_its_experts(checkpoints):
    """load_moe_layer loaded experts 0-3 of an 8-expert checkpoint for a 4-expert placement,
    and read all 8 as half of 16, silently."""
    family = FAMILIES[0]
    directory = checkpoints[family][1]
    layer = MOE_LAYER.get(family, 0)
    E = _num_experts(hf.Checkpoint(directory).config())
    for placement, match in ((Placement.contiguous(E // 2, 1), "placement.num_experts"),
                             (Placement.contiguous(2 * E, 2), "placement.num_experts")):
        with pytest.raises(ValueError, match=match):
            hf.load_moe_layer(directory, layer, placement, 0)
    for kw, match in ((dict(placement=None), "placement=NoneType"),
                      (dict(layer="1"), "layer='1': must be an int"),
                      (dict(checkpoint=str(directory)), "checkpoint=str")):
        args = dict(directory=directory, layer=layer, placement=Placement.contiguous(E, 1), rank=0)
        with pytest.raises(TypeError, match=match):
            hf.load_moe_layer(**{**args, **kw})
    with pytest.raises(TypeError, match="experts='reference': must be an Experts instance"):
        hf.register("reference")


def test_checkpoint_reads_refuse_unknown_names_rows_and_factories(checkpoints):
    """tensor_shape("nope") was a KeyError, tensor_row(name, 99) an IndexError; a
    dispatcher_factory of None a TypeError from the call, one returning None an AttributeError."""
    from rocm_moe.families import family as fam_of

    family = FAMILIES[0]
    directory = checkpoints[family][1]
    ck = hf.Checkpoint(directory)
    gate = fam_of(ck.config().model_type).gate_weight(MOE_LAYER.get(family, 0))
    E = _num_experts(ck.config())
    with pytest.raises(ValueError, match="tensor=nope: is not in the checkpoint's index"):
        ck.tensor_shape("nope")
    for index in (E, -1, 1.0):
        with pytest.raises(ValueError, match=rf"index={index!r}: must be a row of"):
            ck.tensor_row(gate, index, (E, None))
    assert ck.tensor_row(gate, E - 1, (E, None)).shape == ck.tensor_shape(gate)[1:]
    model = _model(directory)
    with pytest.raises(TypeError, match="dispatcher_factory=None: must be callable"):
        hf.replace_moe_blocks(model, None)
    with pytest.raises(TypeError, match=r"dispatcher_factory\(\)=NoneType: must return a "):
        hf.replace_moe_blocks(model, lambda: None)
