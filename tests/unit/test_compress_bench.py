"""The compression benchmark reuses a finished run only when it was made with the settings asked for."""

import importlib.util
import json
from pathlib import Path

import pytest

from app.config import load_config
from app.errors import UserError

_PATH = Path(__file__).resolve().parents[2] / "benchmarks" / "compress.py"
_spec = importlib.util.spec_from_file_location("compress_bench", _PATH)
compress = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(compress)


def _finished(storage: Path, cfg) -> Path:
    artifact = storage / cfg.name / "artifact"
    artifact.mkdir(parents=True)
    (artifact / "model_card.json").write_text(json.dumps({"config_hash": cfg.config_hash()}))
    (storage / cfg.name / "summary.json").write_text("{}")
    return artifact


def test_a_finished_run_is_reused_only_with_the_same_settings(tmp_path):
    made = []

    def make(cfg):
        made.append(cfg)
        return type("Result", (), {"artifact": "trained"})()

    cfg = load_config("tiny", ["name=teacher", "steps=30"])
    assert compress._trained(tmp_path, cfg, make) == "trained" and made == [cfg]  # nothing there: trains
    artifact = _finished(tmp_path, cfg)
    assert compress._trained(tmp_path, cfg, make) == str(artifact) and len(made) == 1  # same settings: reused
    with pytest.raises(UserError, match="other settings.*--out"):
        compress._trained(tmp_path, load_config("tiny", ["name=teacher", "steps=60"]), make)
    assert len(made) == 1


def test_goals_compare_the_fastest_way_of_running_each_model_at_its_worse_batch():
    speeds = {"fp32": {"1": 100.0, "16": 1000.0}, "fp32 (compiled)": {"1": 300.0, "16": 900.0},
              "int8": {"1": 90.0, "16": 2000.0}, "int8 (compiled)": {"1": 450.0, "16": 1800.0}}
    # fastest by the worse batch: the compiled fp32 (900 at b16) beats eager (100 at b1)
    assert compress.fastest(speeds, ["fp32", "fp32 (compiled)", "not measured"])[0] == "fp32 (compiled)"
    name, fast = compress.fastest(speeds, ["int8", "int8 (compiled)"])
    assert name == "int8 (compiled)"
    assert compress.speed_ratio(fast, speeds["fp32 (compiled)"]) == pytest.approx(1.5)  # b1: 450/300; b16: 2.0
    assert compress.speed_ratio(speeds["int8"], speeds["fp32"]) == pytest.approx(0.9)
