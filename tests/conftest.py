"""Shared fixtures: one embedded Ray for the session, a tiny prepared data set, paths."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


def pytest_collection_modifyitems(config, items):
    """Chaos tests start their own multi-node cluster (and stop the embedded Ray): run them last."""
    items.sort(key=lambda item: item.get_closest_marker("chaos") is not None)


@pytest.fixture(scope="session")
def ray_local():
    """One embedded Ray instance for every test that needs it (2 CPUs, like the machine)."""
    import ray

    from pipelines.ray_session import environ
    from serve_deployments.app import PROXY_ENV

    if not ray.is_initialized():
        # as a cluster from cluster.yaml runs Serve: its proxy over gRPC (app.deploy's `auto` ingress picks it)
        with environ(PROXY_ENV):
            ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory, ray_local) -> Path:
    """The tiny preset's data set (200 stdlib files, vocab 512), prepared once through the real pipeline."""
    from pipelines import prepare_data

    out = tmp_path_factory.mktemp("data") / "tiny"
    prepare_data.run(["stdlib"], out, vocab_size=512, max_documents=200, shard_tokens=200_000)
    return out


@pytest.fixture(scope="session")
def smoke(tiny_data, tmp_path_factory):
    """The smoke sweep (tune_configs/smoke.yaml) on the tiny data, once: its tests and the notebook's use it."""
    import app

    out = tmp_path_factory.mktemp("sweep") / "smoke"
    return app.sweep(REPO / "tune_configs" / "smoke.yaml", out, overrides=[f"data.dir={tiny_data}"])


def run_cli(*args: str, timeout: float = 300, env: dict | None = None):
    """Run `python -m app ARGS` in a subprocess; returns CompletedProcess with text output."""
    import subprocess

    full_env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "app", *args], cwd=REPO, capture_output=True, text=True, timeout=timeout, env=full_env
    )
