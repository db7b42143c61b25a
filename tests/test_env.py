"""rocm_moe.env: every ROCM_MOE_* variable the package reads is listed there, documented on its
page, and refused with its name when set to a bad value; ``rocm-moe info`` shows them and fails
on a refused one."""

import re
from pathlib import Path
from types import SimpleNamespace

import pytest

from rocm_moe import env
from rocm_moe._checks import env_switch

ROOT = Path(__file__).resolve().parents[1]
# One bad value per variable (a variable added to rocm_moe.env without one fails
# test_every_variable_has_a_bad_value_case).
BAD = {
    "ROCM_MOE_VLLM": "ture", "ROCM_MOE_SGLANG": "enabled",
    "ROCM_MOE_VLLM_COMM": "nccl", "ROCM_MOE_SGLANG_COMM": "deepep",
    "ROCM_MOE_VLLM_EXPERTS": "cutlass", "ROCM_MOE_SGLANG_EXPERTS": "marlin",
    "ROCM_MOE_VLLM_WEIGHT_MODE": "both", "ROCM_MOE_SGLANG_WEIGHT_MODE": "weighted twice",
    "ROCM_MOE_VLLM_MAX_TOKENS": "4k", "ROCM_MOE_SGLANG_MAX_TOKENS": "0",
    "ROCM_MOE_VLLM_EPLB_POLICY": "default",
    "ROCM_MOE_BF16_STREAM_MAX_SLOTS": "eight", "ROCM_MOE_FP8_SMALL_MAX_SLOTS": "-1",
    "ROCM_MOE_FP8_SMALL_CONFIG": "{", "ROCM_MOE_SHARED_STREAM_MAX_ROWS": "1e3",
    "ROCM_MOE_FP8_CONFIGS": "/nonexistent/fp8_table.json", "ROCM_MOE_GATE_PLAN": "t63",
    "ROCM_MOE_RENDEZVOUS_TIMEOUT_S": "0", "ROCM_MOE_THREADS_PER_RANK": "0",
}
GOOD = {
    "ROCM_MOE_VLLM": "1", "ROCM_MOE_SGLANG": "off", "ROCM_MOE_VLLM_COMM": "symm",
    "ROCM_MOE_SGLANG_EXPERTS": "reference", "ROCM_MOE_VLLM_WEIGHT_MODE": "combine",
    "ROCM_MOE_SGLANG_MAX_TOKENS": "4096", "ROCM_MOE_VLLM_EPLB_POLICY": "rocm_moe",
    "ROCM_MOE_BF16_STREAM_MAX_SLOTS": "0", "ROCM_MOE_FP8_SMALL_CONFIG": '{"8": {"PDL": false}}',
    "ROCM_MOE_SHARED_STREAM_MAX_ROWS": "8", "ROCM_MOE_RENDEZVOUS_TIMEOUT_S": "300",
    "ROCM_MOE_THREADS_PER_RANK": "2",
}


@pytest.fixture
def clean(monkeypatch):
    for var in env.VARIABLES:
        monkeypatch.delenv(var.name, raising=False)
    return monkeypatch


def test_every_variable_in_the_source_is_listed():
    """The ROCM_MOE_* names written in the package (env.py builds the engines' from a prefix)
    are exactly rocm_moe.env's."""
    found = set()
    for path in (ROOT / "rocm_moe").rglob("*.py"):
        if path.name != "env.py":
            found |= set(re.findall(r"\bROCM_MOE_[A-Z0-9_]*[A-Z0-9]\b", path.read_text()))
    assert found == set(env.BY_NAME), (sorted(found - set(env.BY_NAME)),
                                       sorted(set(env.BY_NAME) - found))


@pytest.mark.parametrize("var", env.VARIABLES, ids=lambda v: v.name)
def test_every_variable_is_documented_on_its_page(var):
    page = ROOT / var.docs
    assert page.exists(), var.docs
    assert var.name in page.read_text(), f"{var.name} is not described in {var.docs}"


def test_every_variable_has_a_bad_value_case():
    assert set(BAD) == set(env.BY_NAME)


@pytest.mark.parametrize("name", sorted(BAD))
def test_a_bad_value_is_refused_naming_the_variable(clean, name):
    if name == "ROCM_MOE_GATE_PLAN":
        pytest.importorskip("triton")  # its reader is the Triton gate module's
    clean.setenv(name, BAD[name])
    (line,) = env.problems()
    assert name in line, line
    assert "Fix:" in line, line
    with pytest.raises(ValueError, match=name if name != "ROCM_MOE_GATE_PLAN" else "block_t"):
        env.BY_NAME[name].check()


def test_good_values_and_unset_are_accepted(clean):
    assert env.problems() == []
    for name, value in GOOD.items():
        clean.setenv(name, value)
    assert env.problems() == []
    assert {v.name: value for v, value, verdict in env.settings() if value} == GOOD


def test_env_switch(clean):
    for value in ("1", "true", "True", "YES", "on", " 1 "):
        clean.setenv("X_SWITCH", value)
        assert env_switch("X_SWITCH") is True
    for value in ("", "0", "false", "No", "OFF"):
        clean.setenv("X_SWITCH", value)
        assert env_switch("X_SWITCH") is False
    clean.delenv("X_SWITCH")
    assert env_switch("X_SWITCH") is False
    clean.setenv("X_SWITCH", "2")
    with pytest.raises(ValueError, match=r"X_SWITCH='2': must be one of"):
        env_switch("X_SWITCH")


@pytest.mark.parametrize("engine", ["vllm", "sglang"])
def test_a_mistyped_plugin_switch_is_refused_not_ignored(clean, engine):
    """``ROCM_MOE_VLLM=ture`` used to leave the plug-in silently off; it is refused before the
    engine is imported (so here, without the engine installed, too)."""
    import importlib

    mod = importlib.import_module(f"rocm_moe.integrations.{engine}")
    clean.setenv(mod.SWITCH, "ture")
    with pytest.raises(ValueError, match=f"{mod.SWITCH}='ture'"):
        mod.register()
    clean.setenv(mod.SWITCH, "0")
    assert mod.register() is False


def test_info_lists_the_variables_and_fails_on_a_refused_one(clean, capsys):
    from rocm_moe.cli import info

    assert info.command(None) == 0
    out = capsys.readouterr().out
    assert "ROCM_MOE_SHARED_STREAM_MAX_ROWS" in out
    assert "unset (0: torch's GEMMs)" in out
    clean.setenv("ROCM_MOE_SHARED_STREAM_MAX_ROWS", "many")
    assert info.command(None) == 1
    captured = capsys.readouterr()
    assert "REFUSED" in captured.out
    assert "ROCM_MOE_SHARED_STREAM_MAX_ROWS='many': must be an int >= 0" in captured.err


def test_the_worked_example(clean):
    clean.setenv("ROCM_MOE_BF16_STREAM_MAX_SLOTS", "eight")
    (line,) = env.problems()
    assert line.startswith("ROCM_MOE_BF16_STREAM_MAX_SLOTS='eight': must be an int >= 0")


def test_fp8_small_max_slots_is_read_when_the_experts_are_built(clean):
    """A bad value fails building TritonFP8Experts (naming it), not importing rocm_moe."""
    from rocm_moe.experts.triton_fp8 import TritonFP8Experts

    clean.setenv("ROCM_MOE_FP8_SMALL_MAX_SLOTS", "16")
    assert TritonFP8Experts().small_max_slots == 16
    clean.setenv("ROCM_MOE_FP8_SMALL_MAX_SLOTS", "x")
    with pytest.raises(ValueError, match="ROCM_MOE_FP8_SMALL_MAX_SLOTS='x'"):
        TritonFP8Experts()


def test_fp8_table_file_must_exist(clean, tmp_path):
    from rocm_moe.experts import triton_fp8

    clean.setenv(triton_fp8.CONFIG_ENV, str(tmp_path / "missing.json"))
    with pytest.raises(ValueError, match="names no file here"):
        triton_fp8.fp8_config_table()
    table = tmp_path / "t.json"
    table.write_text("{}")
    clean.setenv(triton_fp8.CONFIG_ENV, str(table))
    assert triton_fp8.fp8_config_table() == {}


@pytest.mark.parametrize(("name", "value", "match"), [
    ("ROCM_MOE_FP8_SMALL_CONFIG", '{"gateup": {"BLOCK_N": 8}}', r"\.gateup=.*is not a config key"),
    ("ROCM_MOE_FP8_SMALL_CONFIG", '{"8x": {"PDL": true}}', r"\.8x=.*is not a config key"),
    ("ROCM_MOE_FP8_SMALL_CONFIG", '{"8": {"PDL": true}, "down": {"BLOCK_N": 8}}', r"\.8="),
    ("ROCM_MOE_FP8_SMALL_MAX_SLOTS", "\u00b2", "must be an int >= 0"),
    ("ROCM_MOE_THREADS_PER_RANK", "\u00b2", "must be an integer >= 1"),
    ("ROCM_MOE_SHARED_STREAM_MAX_ROWS", "5000", "must be at most 1024"),
])
def test_values_that_were_dropped_cut_or_crashed(clean, name, value, match):
    """Each was taken wrongly before: an unknown config object dropped (the defaults ran), a
    superscript digit passing ``isdigit`` into ``int()``, 5000 rows cut to 1024."""
    clean.setenv(name, value)
    with pytest.raises(ValueError, match=match):
        env.BY_NAME[name].check()


@pytest.mark.parametrize(("text", "match"), [("{", "not JSON"), ("[1]", "must be a JSON object"),
                                             ('{"H100": [1]}', "must be a JSON object")])
def test_fp8_table_that_is_not_a_table(clean, tmp_path, text, match):
    from rocm_moe.experts import triton_fp8

    path = tmp_path / f"t{len(text)}.json"
    path.write_text(text)
    clean.setenv(triton_fp8.CONFIG_ENV, str(path))
    with pytest.raises(ValueError, match=match):
        triton_fp8.fp8_config_table()


def test_empty_means_unset_for_every_engine_variable(clean):
    """rocm-moe info and the plug-ins read a variable alike: empty is unset for both engines'
    (SGLang's plug-in refused an empty COMM / EXPERTS, vLLM's took it as unset)."""
    from rocm_moe.integrations import sglang as rs
    from rocm_moe.integrations import vllm as rv

    for var in env.VARIABLES:
        if var.name.startswith(("ROCM_MOE_VLLM_", "ROCM_MOE_SGLANG_")):
            clean.setenv(var.name, "")
    assert env.problems() == []
    assert rs._backend_choice("comm", rs.ENV_COMM, lambda: ("local", "")) == "local"
    assert rs.token_budget(None)[0] >= 1
    assert rv.max_tokens_per_rank(SimpleNamespace(max_num_tokens=512, max_capture_size=8)) == 512
