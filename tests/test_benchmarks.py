"""The helpers every `rocm-moe bench` command prints and writes its results with."""

import json

from rocm_moe.benchmarks import cell, print_rows, write_json


def test_cell_worked_example():
    assert cell(0.8081) == "0.81"
    assert cell(0.8081, small_digits=3) == "0.808"
    assert cell(121.73) == "121.7"
    assert cell(None) == "-"
    assert cell(7) == "7"
    assert cell(True) == "True"


def test_print_rows_one_column_per_key():
    from rich.console import Console

    console = Console(width=120, record=True)
    print_rows(console, [dict(tokens=1, us=98.43, ratio=0.8081, extra=None)], title="t")
    text = console.export_text()
    for s in ("tokens", "ratio", "98.4", "0.81", "-"):
        assert s in text


def test_write_json_makes_the_folder_and_leads_with_date_device_torch(tmp_path):
    path = write_json(tmp_path / "new", "stem", device="cpu", rows=[1, 2])
    assert path == tmp_path / "new" / "stem.json"
    data = json.loads(path.read_text())
    assert list(data) == ["date", "device", "torch", "rows"]
    assert data["device"] == "cpu"
    assert data["rows"] == [1, 2]
