"""Warm standby workers (pipelines/standby.py): the runtime environment that makes them, the board watch that ends
them, and the process age that tells a warm restart from a cold one. The raylet side is exercised by the chaos
tests (a killed worker's group restarts on two standbys)."""

import os
import time

import psutil
import pytest

from pipelines import chaos, standby


def test_the_runtime_environment_names_the_hook_and_the_run():
    env = standby.worker_runtime_env("ns-1", "scalestack-progress-r", use_gpu=False)["env_vars"]
    assert env[standby.SETUP_HOOK_ENV] == "pipelines.standby.warm_cpu_worker"
    assert env[standby.RUN_ENV] == "ns-1/scalestack-progress-r"
    gpu = standby.worker_runtime_env("ns-1", "scalestack-progress-r", use_gpu=True)["env_vars"]
    assert gpu[standby.SETUP_HOOK_ENV] == "pipelines.standby.warm_gpu_worker"  # no DeepSpeed import: no CUDA probe


def test_the_hook_env_var_is_the_one_ray_reads():
    from ray._private import ray_constants

    assert standby.SETUP_HOOK_ENV == ray_constants.WORKER_PROCESS_SETUP_HOOK_ENV_VAR


def test_the_predicted_worker_env_is_ray_trains_merge_written_as_ray_writes_it(ray_local):
    """The first group's standbys are made for this string; a single differing byte would leave them idle (the chaos
    test's kill-worker scenario checks the prediction against a real group)."""
    import json

    from ray.train.v2._internal.constants import get_env_vars_to_propagate

    ours = standby.worker_runtime_env("ns-1", "board", use_gpu=False)
    predicted = standby.expected_worker_env({**ours, "env_vars": {**ours["env_vars"], "A": "1"}})
    assert " " not in predicted and list(json.loads(predicted)) == sorted(json.loads(predicted))
    env = json.loads(predicted)["env_vars"]
    assert list(env) == sorted(env)
    assert env["A"] == "1" and env[standby.RUN_ENV] == "ns-1/board"
    assert env["RAY_WARN_BLOCKING_GET_INSIDE_ASYNC"] == "0"
    assert get_env_vars_to_propagate().items() <= env.items()


def test_process_start_time_is_precise():
    started = standby.process_start_time()
    assert started <= time.time()
    assert abs(started - psutil.Process().create_time()) < 1.5  # psutil rounds the boot time to a second


@pytest.fixture
def watch(monkeypatch):
    """`_watch` against a fake GCS: `present[0]` says whether the board exists; returns the exit codes seen."""
    import ray

    present, exits, looks = [True], [], []
    monkeypatch.setattr(standby, "WATCH_INTERVAL_S", 0.01)
    monkeypatch.setattr(standby, "_claimed", __import__("threading").Event())

    def get_actor(name, namespace=None):
        looks.append((namespace, name))
        if len(looks) > 200:
            raise SystemExit  # a safety stop for the test, never reached when the watch works
        if not present[0]:
            raise ValueError(f"Failed to look up actor with name '{name}'")
        return object()

    def exit_(code):
        exits.append(code)
        raise SystemExit

    monkeypatch.setattr(ray, "get_actor", get_actor)
    monkeypatch.setattr(os, "_exit", exit_)
    return present, exits, looks


def test_an_idle_standby_exits_once_its_run_is_over(watch):
    present, exits, looks = watch
    present[0] = False
    with pytest.raises(SystemExit):
        standby._watch("ns/board")
    assert exits == [0]
    assert looks[-2:] == [("ns", "board"), ("ns", "board")]  # two misses in a row, in the run's namespace


def test_a_claimed_standby_stops_watching(watch):
    present, exits, looks = watch
    standby.claim()
    standby._watch("ns/board")  # returns at once: the process trains now
    assert exits == [] and looks == []


def test_warm_workers_counts_processes_older_than_their_group():
    attempt = {"group_start": 100.0, "workers": [{"process_start": 40.0}, {"process_start": 100.5}]}
    assert chaos.warm_workers(attempt) == "1/2"
    assert chaos.warm_workers({"group_start": None, "workers": [{"process_start": 1.0}]}) == "0/1"
