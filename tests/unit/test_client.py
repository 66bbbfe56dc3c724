"""app.client's pure parts without Ray: entrypoint quoting, submission ids, the job's runtime env, the result line."""

import json
import os
import shlex
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest

from app.__main__ import main
from app.client import (
    RESULT_PREFIX,
    UPLOAD_EXCLUDES,
    JobResult,
    build_entrypoint,
    default_submission_id,
    job_runtime_env,
    parse_result,
    result_line,
    run_name,
)
from app.errors import UserError
from tests.conftest import REPO


def test_entrypoint_quotes_every_word():
    ep = build_entrypoint("train", ["--preset", "tiny", "--set", "data.domains=[code, docs]", "--run-name", "a b",
                                    "--steps", 8, Path("/tmp/x y")])
    assert ep == ("python -m app train --preset tiny --set 'data.domains=[code, docs]' --run-name 'a b' "
                  "--steps 8 '/tmp/x y'")
    assert shlex.split(ep)[3:] == ["train", "--preset", "tiny", "--set", "data.domains=[code, docs]", "--run-name",
                                   "a b", "--steps", "8", "/tmp/x y"]
    assert build_entrypoint("prepare-data") == "python -m app prepare-data"
    assert build_entrypoint("info", ["--preset", "$(rm -rf ~)"]) == "python -m app info --preset '$(rm -rf ~)'"


def test_unknown_command_is_a_user_error_listing_the_commands():
    with pytest.raises(UserError, match=r"command 'trian' is not a scalestack command; use one of prepare-data, "
                                        r"info, train, "):
        build_entrypoint("trian")


def test_run_name_and_default_submission_id():
    assert run_name(["--preset", "tiny", "--run-name", "big-one"]) == "big-one"
    assert run_name(["--run-name=x", "--set", "name=y"]) == "y"  # the last one wins, as in the CLI
    assert run_name(["--preset", "tiny"]) is None
    assert run_name(["--run-name"]) is None
    assert default_submission_id("train", ["--run-name", "my run/1"], suffix="abc123") == \
        "scalestack-train-my-run-1-abc123"
    when = datetime(2026, 11, 23, 9, 5, 7)
    assert default_submission_id("info", [], now=when, suffix="0f0f0f") == "scalestack-info-20261123-090507-0f0f0f"
    a, b = default_submission_id("eval", ["m"]), default_submission_id("eval", ["m"])
    assert a != b and a.startswith("scalestack-eval-") and len(a.rsplit("-", 1)[1]) == 6


def test_runtime_env_defaults_merges_and_precedence():
    out = job_runtime_env()
    assert out["working_dir"] == str(REPO)  # the checkout this app/ comes from
    assert out["excludes"] == UPLOAD_EXCLUDES
    assert out["env_vars"] == {"RAY_USAGE_STATS_ENABLED": "0", "SCALESTACK_RESULT_LINE": "1", "PYTHONUNBUFFERED": "1"}

    mine = {"working_dir": "/src", "excludes": ["/data", "/runs"], "pip": ["rich"],
            "env_vars": {"A": "1", "PYTHONUNBUFFERED": "0"}}
    out = job_runtime_env(mine, env={"A": 2, "B": "x"})
    assert out["working_dir"] == "/src" and out["pip"] == ["rich"]
    assert out["excludes"] == ["/data", "/runs", *(e for e in UPLOAD_EXCLUDES if e != "/runs")]
    assert out["env_vars"] == {"RAY_USAGE_STATS_ENABLED": "0", "SCALESTACK_RESULT_LINE": "1", "PYTHONUNBUFFERED": "0",
                               "A": "2", "B": "x"}
    assert mine["env_vars"] == {"A": "1", "PYTHONUNBUFFERED": "0"}  # the caller's dict is not changed
    assert job_runtime_env(mine, working_dir=Path("/elsewhere"))["working_dir"] == "/elsewhere"


def test_upload_excludes_skip_heavy_folders_whole_with_rays_matcher():
    from ray._private.runtime_env.packaging import _get_excludes  # what Ray runs on the working dir

    excluded = _get_excludes(REPO, UPLOAD_EXCLUDES)
    for path in ["runs", ".venv", ".git", "benchmarks/results", "app/__pycache__", "scalestack.egg-info"]:
        assert excluded(REPO / path), path  # the folder itself, so Ray never walks into it
    for path in ["app", "app/client.py", "benchmarks", "benchmarks/compress.py", "pipelines", "tune_configs"]:
        assert not excluded(REPO / path), path


def test_result_line_round_trip_and_last_line_wins():
    line = result_line({"run_dir": Path("/r/x"), "n": np.int64(3), "loss": np.float32(0.5), "arr": np.arange(2),
                        "nested": {"ok": True}})
    assert line == RESULT_PREFIX + '{"run_dir":"/r/x","n":3,"loss":0.5,"arr":[0,1],"nested":{"ok":true}}'
    assert "\n" not in line
    logs = "\n".join(["starting", result_line({"v": 1}), "noise scalestack-result: {\"v\": 9}",
                      result_line({"v": 2}), "shutting down"])
    assert parse_result(logs) == {"v": 2}
    assert parse_result("no result here\n") is None
    assert "<td>nested</td><td>{&quot;ok&quot;: true}</td>" in JobResult({"nested": {"ok": True}})._repr_html_()


def test_cli_prints_the_result_line_only_when_asked(capsys, monkeypatch):
    monkeypatch.delenv("SCALESTACK_RESULT_LINE", raising=False)
    assert main(["plan", "--flops", "1e20", "--instance", "g5.xlarge"]) == 0
    assert RESULT_PREFIX not in capsys.readouterr().out

    monkeypatch.setenv("SCALESTACK_RESULT_LINE", "1")
    assert main(["plan", "--flops", "1e20", "--instance", "g5.xlarge", "--json"]) == 0
    out = capsys.readouterr().out
    last = out.rstrip("\n").splitlines()[-1]
    assert last.startswith(RESULT_PREFIX)
    assert parse_result(out) == json.loads(out[:out.index(RESULT_PREFIX)])  # the same plan as --json prints
    assert parse_result(out)["instance"] == "g5.xlarge"

    assert main(["models", "list", "--registry", str(REPO / "tests" / "no-such-registry")]) == 0
    assert parse_result(capsys.readouterr().out) == {"command": "models", "exit": 0}

    assert main(["plan", "--usd", "100"]) == 1  # a user error: no result line
    assert RESULT_PREFIX not in capsys.readouterr().out


def test_importing_app_loads_neither_ray_nor_torch():
    code = "import sys, app; assert app.Client and app.chaos; print(sorted({'ray', 'torch'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60,
                         env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_no_job_server_at_the_address_is_a_user_error(monkeypatch):
    import socket

    from app.client import Client

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("RAY_ADDRESS", "http://127.0.0.1:1")  # an explicit address wins over the variable
    with pytest.raises(UserError, match=rf"no Ray job server answers at http://127.0.0.1:{port} \(connecting\)"):
        Client(f"http://127.0.0.1:{port}")
    assert os.environ["RAY_ADDRESS"] == "http://127.0.0.1:1"
