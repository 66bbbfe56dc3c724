"""The CLI front door: every command listed, user mistakes end in one stderr line and a non-zero exit."""

import pytest

from app.__main__ import COMMANDS
from tests.conftest import run_cli


def test_help_lists_every_command():
    result = run_cli("--help")
    assert result.returncode == 0
    for name in COMMANDS:
        assert name in result.stdout


@pytest.mark.parametrize(
    "args,code,match",
    [
        (["info", "--preset", "bnch"], 1, "error: unknown preset 'bnch'; did you mean 'bench'?"),
        (["info", "--set", "model.n_layr=3"], 1, "did you mean 'model.n_layer'?"),
        (["info", "--set", "lr"], 1, "override 'lr' is not KEY=VALUE"),
        (["prepare-data", "--source", "/no/such/dir", "--out", "/no/such/out"], 1, "no such file or folder"),
        (["prepare-data", "--preset", "tiny", "--set", "data.val_fraction=2"], 1, "data.val_fraction"),
        (["info", "--bogus"], 2, "unrecognized arguments: --bogus"),
        (["nope"], 2, "invalid choice: 'nope'"),
    ],
)
def test_user_mistakes_are_one_line(args, code, match):
    result = run_cli(*args)
    assert result.returncode == code
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert match in lines[0]
    assert "Traceback" not in result.stderr


def test_info_json_matches_model():
    import json

    result = run_cli("info", "--preset", "tiny", "--json")
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    d, L, V, T = 64, 2, 512, 64
    assert info["params_non_embedding"] == L * (12 * d * d + 13 * d) + 2 * d
    assert info["params_total"] == info["params_non_embedding"] + V * d + T * d
    assert info["memory_per_worker_bytes"] > 16 * info["params_total"] // 2  # ZeRO-2 over 2 workers, plus activations


def test_sdk_functions_survive_importing_their_namesake_modules():
    """app.distill / app.quantize / app.evaluate are SDK functions and also modules (app/distill.py, ...); importing
    a module must not replace the function (a second app.distill(...) in a notebook failed that way)."""
    import importlib
    import sys

    import app
    from app import sdk

    for name in ("distill", "quantize", "evaluate"):
        module = importlib.import_module(f"app.{name}")
        assert getattr(app, name) is getattr(sdk, name), name
        assert sys.modules[f"app.{name}"] is module and callable(getattr(app, name))
    from app.distill import kd_loss  # the modules' own names still import

    assert callable(kd_loss)
