"""Chaos harness: train on a local multi-node Ray cluster, inject one fault, and measure what it cost.

    python -m app chaos --preset tiny --scenario spot

The harness starts a head (no CPUs) and one worker node per training worker as separate raylets on this machine,
trains an undisturbed reference run, then the same run (elastic, `1:N` workers) while it injects the fault:

  spot             `ray drain-node --reason DRAIN_NODE_REASON_PREEMPTION` with a deadline, then the node is removed
                   when the deadline passes; a fresh node joins later and the group grows back
  kill-worker      SIGKILL of one training worker process
  kill-node        a worker node removed without notice; a fresh node joins later
  torn-checkpoint  the newest checkpoint loses a shard, then a worker is killed: the restart must skip it
  resize           a node leaves (drained with a deadline, removed at it), and joins again once the group has
                   trained without it: world 2 → 1 → 2

It writes chaos.json with recovery_s, lost_steps, duplicated_samples, skipped_samples,
max_rel_loss_diff_vs_reference, goodput and world_sizes, and stops every process it started.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from app.config import TrainConfig
from app.errors import ConfigError

SCENARIOS = ("spot", "kill-worker", "kill-node", "torn-checkpoint", "resize")


@dataclass
class ChaosResult:
    report: dict[str, Any]
    path: Path
    reference: Any = None  # the undisturbed TrainResult, reusable for further scenarios
    disturbed: Any = None

    def _repr_html_(self) -> str:
        from app.console import html_table

        return html_table(["metric", "value"], list(self.report.items()))


class LocalCluster:
    """A head without CPUs plus `n` worker nodes of `cpus` CPUs each, as separate raylets on this machine."""

    def __init__(self, n: int, cpus: int) -> None:
        from ray.cluster_utils import Cluster

        self.cpus = cpus
        from pipelines.elastic import NODE_HEALTH_CHECK

        self.cluster = Cluster(initialize_head=True,
                               head_node_args={"num_cpus": 0, "_system_config": dict(NODE_HEALTH_CHECK)})
        self.workers = [self.cluster.add_node(num_cpus=cpus) for _ in range(n)]
        self.cluster.wait_for_nodes()

    @property
    def address(self) -> str:
        return self.cluster.address

    def node(self, node_id: str):
        return next(n for n in self.workers if n.node_id == node_id)

    def remove(self, node_id: str) -> None:
        node = self.node(node_id)
        self.workers.remove(node)
        self.cluster.remove_node(node, allow_graceful=False)

    def add(self) -> None:
        self.workers.append(self.cluster.add_node(num_cpus=self.cpus))

    def drain(self, node_id: str, reason: str, deadline_s: int | None) -> None:
        """`ray drain-node` exactly as a spot reclaim (or a scale-down) issues it."""
        cmd = [str(Path(sys.executable).parent / "ray"), "drain-node", "--address", self.address,
               "--node-id", node_id, "--reason", reason, "--reason-message", "scalestack chaos harness"]
        if deadline_s is not None:
            cmd += ["--deadline-remaining-seconds", str(deadline_s)]
        subprocess.run(cmd, check=True, capture_output=True, text=True,
                       env={**os.environ, "RAY_ADDRESS": self.address})

    def shutdown(self) -> None:
        self.cluster.shutdown()


@contextlib.contextmanager
def local_cluster(n: int, cpus: int):
    """A `LocalCluster` with this driver connected to it; disconnects and stops every process on the way out."""
    import ray

    cluster = LocalCluster(n, cpus)
    try:
        ray.init(address=cluster.address, log_to_driver=os.environ.get("SCALESTACK_VERBOSE") == "1")
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()


class _Follower:
    """Reads the disturbed run's progress board (by name) while training goes on in another thread."""

    def __init__(self, run_name: str) -> None:
        self.run_name = run_name

    def _board(self):
        import ray

        from pipelines.train import board_name

        return ray.get_actor(board_name(self.run_name))

    def wait_for_step(self, step: int, timeout: float = 600) -> None:
        import ray

        deadline = time.time() + timeout
        while time.time() < deadline:
            try:
                records, _, _ = ray.get(self._board().snapshot.remote(0))
                if records and records[-1]["step"] >= step:
                    return
            except ValueError:  # board not created yet
                pass
            time.sleep(0.2)
        raise TimeoutError(f"training did not reach step {step} within {timeout:.0f} s")

    def wait_for_world_size(self, size: int, timeout: float = 600) -> None:
        """Until a step trained at world size `size` has been posted."""
        import ray

        deadline = time.time() + timeout
        while time.time() < deadline:
            records, _, _ = ray.get(self._board().snapshot.remote(0))
            if records and records[-1]["world_size"] == size:
                return
            time.sleep(0.2)
        raise TimeoutError(f"training did not run at world size {size} within {timeout:.0f} s")

    def workers(self) -> list[dict]:
        import ray

        return ray.get(self._board().live_workers.remote())


def _inject(scenario: str, cluster: LocalCluster, follower: _Follower, run_path: Path, at_step: int,
            notice_s: int, rejoin_after_s: float | None) -> dict[str, float]:
    """Do the damage; returns when it happened (notice and death, epoch seconds)."""
    from app.checkpoint import latest_complete, storage_fs

    follower.wait_for_step(at_step)
    victim = max(follower.workers(), key=lambda w: w["rank"])  # the highest rank: not the reporting rank 0
    times: dict[str, float] = {}
    if scenario == "spot":
        times["notice"] = time.time()
        cluster.drain(victim["node_id"], "DRAIN_NODE_REASON_PREEMPTION", notice_s)
        time.sleep(notice_s)
        cluster.remove(victim["node_id"])  # the cloud reclaims the machine at the deadline
        times["death"] = time.time()
        if rejoin_after_s is not None:
            time.sleep(rejoin_after_s)
            cluster.add()  # spot capacity comes back
    elif scenario == "kill-worker":
        times["death"] = time.time()
        os.kill(victim["pid"], signal.SIGKILL)
    elif scenario == "kill-node":
        cluster.remove(victim["node_id"])
        times["death"] = time.time()
        if rejoin_after_s is not None:
            time.sleep(rejoin_after_s)
            cluster.add()
    elif scenario == "torn-checkpoint":
        fs, path = storage_fs(str(run_path))
        found = latest_complete(fs, path)
        assert found is not None, "a checkpoint must exist before it can be damaged"
        shard = sorted(Path(found.path, "state").glob("*optim_states.pt"))[-1]
        shard.unlink()  # a lost shard: the marker still lists it
        times["damaged_step"] = found.step
        times["death"] = time.time()
        os.kill(victim["pid"], signal.SIGKILL)
    elif scenario == "resize":
        # A planned departure: Ray accepts an IDLE_TERMINATION drain only for idle nodes, so the node is drained
        # like a reclaim (with `notice_s`) and leaves at the deadline; it joins again once the group has trained
        # without it, so the run really goes 2 → 1 → 2.
        smaller = max(1, len(follower.workers()) - 1)
        times["notice"] = time.time()
        cluster.drain(victim["node_id"], "DRAIN_NODE_REASON_PREEMPTION", notice_s)
        time.sleep(notice_s)
        cluster.remove(victim["node_id"])
        times["death"] = time.time()
        follower.wait_for_world_size(smaller)
        time.sleep(rejoin_after_s or 0.0)
        cluster.add()  # a resize always comes back: that is the scenario
    return times


def train_with_fault(cfg: TrainConfig, scenario: str, cluster: LocalCluster, at_step: int, notice_s: int,
                     rejoin_after_s: float | None) -> tuple[Any, dict[str, float] | None]:
    """Train `cfg` on `cluster` (this driver already connected to it) and inject `scenario` once training passes
    `at_step`. Returns (TrainResult, when the fault happened); the times are None when the run ended before
    `at_step`. A run that fails raises here, also before the fault."""
    result, faults = train_with_faults(cfg, scenario, cluster, [at_step], notice_s, rejoin_after_s)
    return result, (faults[0] if faults else None)


def train_with_faults(cfg: TrainConfig, scenario: str, cluster: LocalCluster, at_steps: Sequence[int],
                      notice_s: int, rejoin_after_s: float | None) -> tuple[Any, list[dict[str, float]]]:
    """Like `train_with_fault`, injecting `scenario` once past each of `at_steps` (ascending). Every fault after
    the first waits until the group has grown back to full size, so each one hits a whole group (as a reclaim
    after the autoscaler replaced the last one would). Returns (TrainResult, one times dict per fault injected)."""
    from app.config import parse_workers
    from pipelines import train

    outcome: dict[str, Any] = {}

    def fit() -> None:
        try:
            outcome["result"] = train.run(cfg)
        except BaseException as err:  # surfaced on the caller's thread below
            outcome["error"] = err

    thread = threading.Thread(target=fit, daemon=True)
    thread.start()
    follower, faults, pending = _Follower(cfg.name), [], sorted(at_steps)
    full = parse_workers(cfg.parallel.workers)[1]
    try:
        while thread.is_alive() and pending:  # a run that fails early must not leave us waiting for its step
            try:
                follower.wait_for_step(pending[0], timeout=1.0)
                if faults and len(follower.workers()) < full:
                    time.sleep(0.5)  # not grown back yet
                    continue
            except TimeoutError:
                continue
            faults.append(_inject(scenario, cluster, follower, Path(cfg.storage).resolve() / cfg.name,
                                  pending.pop(0), notice_s, rejoin_after_s))
    finally:
        # Also when an injection failed: the run then ends undisturbed (or recovers from what was done), and only
        # after that may the cluster be shut down — a driver thread still training would reconnect to it.
        thread.join()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"], faults


def recovery_s(records: list[dict], death: float, notice: float | None = None) -> float | None:
    """Seconds training stood still for a fault: from the node's death to the start of the first step of a later
    attempt than the one running at the fault. After a drain notice, from whichever came first, the death or the
    last step of the group that got the notice: that group ends once its checkpoint before the deadline is sealed
    and restarts on the nodes that stay, often before the node is gone. None when no attempt started after it."""
    running = max((r["attempt"] for r in records if r["time"] <= (death if notice is None else notice)), default=0)
    stopped = death
    if notice is not None:
        stopped = min(death, max((r["time"] for r in records if r["attempt"] == running), default=death))
    after = [r["time"] - r["step_time_s"] for r in records if r["attempt"] > running]
    return min(after) - stopped if after else None


def warm_workers(attempt: dict) -> str:
    """'warm/all' for one worker group: how many of its workers were warm standbys, processes that already ran when
    the controller began creating the group (pipelines/standby.py)."""
    workers, start = attempt.get("workers", []), attempt.get("group_start")
    warm = sum(start is not None and w["process_start"] < start for w in workers)
    return f"{warm}/{len(workers)}"


def measure(reference, disturbed, times: dict[str, float], scenario: str) -> dict[str, Any]:
    """The chaos report: what the fault cost against the undisturbed reference."""
    import numpy as np

    ref_ids = Counter(i for ids in reference.history["sample_ids"] for i in ids)
    got_ids = Counter(i for ids in disturbed.history["sample_ids"] for i in ids)
    ref_loss = reference.history.set_index("step")["loss"]
    got_loss = disturbed.history.set_index("step")["loss"]
    common = ref_loss.index.intersection(got_loss.index)
    rel = (got_loss[common] - ref_loss[common]).abs() / ref_loss[common]
    recovery = recovery_s(disturbed.records, times.get("death", 0.0), times.get("notice"))
    report = {
        "scenario": scenario,
        "recovery_s": round(recovery, 2) if recovery is not None else None,
        "lost_steps": disturbed.summary["lost_steps"],
        "duplicated_samples": int(sum((got_ids - ref_ids).values())),
        "skipped_samples": int(sum((ref_ids - got_ids).values())),
        "max_rel_loss_diff_vs_reference": float(np.max(rel)) if len(rel) else None,
        "goodput": disturbed.summary["goodput"],
        "reference_goodput": reference.summary["goodput"],
        "world_sizes": disturbed.summary["world_sizes"],
        "restarts": disturbed.summary["restarts"],
        "resumed_from_steps": [a["start_step"] for a in disturbed.attempts],
        "steps": disturbed.summary["steps"],
        # per worker group, the first included: how many of its workers were warm standbys (processes started
        # before the group was)
        "warm_standby_workers": [warm_workers(a) for a in disturbed.attempts],
    }
    if "notice" in times:
        report["notice_s"] = round(times["death"] - times["notice"], 2)
        jit = [r for r in disturbed.records if times["notice"] <= r["time"] <= times["death"]]
        report["steps_during_notice"] = len(jit)
    if "damaged_step" in times:
        report["damaged_checkpoint_step"] = int(times["damaged_step"])
    return report


def run(cfg: TrainConfig, scenario: str, *, out: str | Path = "runs/chaos", inject_at_step: int | None = None,
        notice_s: int = 8, rejoin_after_s: float | None = 4.0, reference=None) -> ChaosResult:
    """Reference run, then the disturbed run with `scenario` injected; writes `out/<scenario>/chaos.json`.
    `rejoin_after_s=None` keeps a lost node away, so the run finishes on what survived. Pass `reference` (a
    TrainResult of the same config) to compare several scenarios against one undisturbed run."""
    from app.config import parse_workers
    from pipelines import train

    if scenario not in SCENARIOS:
        raise ConfigError(f"--scenario {scenario!r} is not one of {', '.join(SCENARIOS)}")
    workers = parse_workers(cfg.parallel.workers)[1]
    if workers < 2:
        raise ConfigError("the chaos harness needs parallel.workers >= 2 so that a node can be lost; use --workers 2")
    if notice_s < 1:
        raise ConfigError(f"--notice {notice_s}: a drain notice needs a deadline at least 1 s away; use e.g. --notice 8")
    if rejoin_after_s is not None and rejoin_after_s < 0:
        raise ConfigError(f"rejoin_after_s={rejoin_after_s:g}: a node cannot rejoin before it left; use 0 or more, or "
                          "None (--no-rejoin) to keep it away")
    at_step = inject_at_step if inject_at_step is not None else max(2, cfg.steps // 3)
    if not 0 < at_step < cfg.steps:
        raise ConfigError(f"--inject-at-step {at_step} must lie inside the run's {cfg.steps} steps")
    out = Path(out).resolve() / scenario
    storage = out / "runs"
    base = {"storage": str(storage), "data": cfg.data.model_copy(update={"dir": str(Path(cfg.data.dir).resolve())})}
    reference_cfg = cfg.model_copy(update={**base, "name": "reference", "stop_at": None})
    disturbed_cfg = cfg.model_copy(update={
        **base, "name": "disturbed", "stop_at": None,
        "parallel": cfg.parallel.model_copy(update={"workers": f"1:{workers}"}),
        # Checkpoint often enough that a fault without notice loses a bounded number of steps.
        "checkpoint": cfg.checkpoint.model_copy(update={"every_steps": cfg.checkpoint.every_steps or max(1, cfg.steps // 6)}),
    })
    every = disturbed_cfg.checkpoint.every_steps
    if scenario == "torn-checkpoint" and at_step < every:
        raise ConfigError(f"--inject-at-step {at_step}: torn-checkpoint damages the newest checkpoint, and the first "
                          f"comes at step {every}; inject after it (or lower checkpoint.every_steps)")
    for name in ("reference", "disturbed"):
        shutil.rmtree(storage / name, ignore_errors=True)

    with local_cluster(workers, cfg.parallel.cpus_per_worker) as cluster:
        reference = reference or train.run(reference_cfg)
        disturbed, times = train_with_fault(disturbed_cfg, scenario, cluster, at_step, notice_s, rejoin_after_s)
        if times is None:
            raise ConfigError(f"the run ended before step {at_step}, where the fault was due; inject earlier")
        report = measure(reference, disturbed, times, scenario)
    out.mkdir(parents=True, exist_ok=True)
    (out / "chaos.json").write_text(json.dumps(report, indent=2))
    return ChaosResult(report, out / "chaos.json", reference, disturbed)
