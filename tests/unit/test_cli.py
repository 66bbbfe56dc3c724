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
