"""Elastic worker groups: a TorchTrainer whose elastic scaling only picks world sizes the batch plan accepts,
counts no draining node, checkpoints before it resizes a running group, restarts a group on the nodes that stay as
soon as its checkpoint before a preemption deadline is sealed, and the recovery knobs that decide how fast a group
comes back after a node is lost.

Ray Train's elastic policy starts as many workers as resources allow within (min, max). A global batch of 32 with
micro-batch 8 splits over 1, 2 or 4 workers but not 3, so we round its choice down to the nearest accepted size.
Ray 2.60 has no public hook for that: we replace the scaling policy the trainer hands its controller. This leans
on ray.train.v2 internals, which is why ray is pinned to 2.60.0 in constraints.txt.
"""

from __future__ import annotations

import bisect
import logging
import os
import time
from typing import Any, NamedTuple

from ray.train.torch import TorchTrainer
from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback
from ray.train.v2._internal.execution.callback import WorkerGroupCallback
from ray.train.v2._internal.execution.failure_handling import DefaultFailurePolicy
from ray.train.v2._internal.execution.scaling_policy import ElasticScalingPolicy, NoopDecision, ResizeDecision
from ray.train.v2.api.exceptions import PreemptionError, WorkerGroupError

log = logging.getLogger(__name__)

SAVE_BEFORE_RESIZE_TIMEOUT_S = 60.0
"""How long a resize waits for the group's checkpoint before it goes ahead without one."""

STANDBY_LEAD_S = 5.0
"""A group grows onto a node that joined only once the warm standbys asked for there have had this long to start
(importing torch and DeepSpeed takes 3-6 s on a 2-core VM beside a training group); meanwhile it trains at its size."""

LEFT_GRACE_S = 30.0
"""A node seen draining is left out of restart counts until this long after its deadline (or after it was last seen
draining, without one), or until Ray forgets it (declared dead). One that outlives that (a cancelled reclaim) counts
again, and the group grows back onto it."""

# Environment variables Ray Train reads in its controller; our config sets them before the controller starts.
RECOVERY_ENV = {
    "worker_group_start_timeout_s": "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S",
    "health_check_interval_s": "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S",
    "preemption_poll_interval_s": "RAY_TRAIN_PREEMPTION_POLL_INTERVAL_S",
}

NODE_HEALTH_CHECK = {
    "health_check_period_ms": 1000,
    "health_check_timeout_ms": 5000,
    "health_check_failure_threshold": 3,
}
"""The GCS's node health checks for a cluster that loses nodes without notice (the head's `ray start` takes them as
RAY_<name> variables; cluster.yaml and the chaos harness's local cluster set them). Ray's defaults (every 3 s,
dead after 5 failures) leave a node that died unannounced on the books for 15 s or more, and a restart meanwhile
waits for it; these declare a dead raylet within ~3 s, and a machine that vanished within ~18 s instead of ~65 s."""


class _PendingResize(NamedTuple):
    """A resize waiting for the checkpoint it asked the workers for."""

    decision: ResizeDecision
    token: int  # the board's request token
    asked_at: float  # monotonic seconds
    group: Any  # the asked group's start time: a restart meanwhile makes the request moot


class AcceptedSizesScalingPolicy(ElasticScalingPolicy):
    """Ray's elastic policy, rounded down to the largest world size the run's batch plan accepts, counting no
    node that is being drained.

    Ray counts the resources of every node it has not yet declared dead, and a reclaimed node is declared dead only
    after the GCS misses its health checks (about 15 s by default). A group restarted at the drain deadline therefore
    asked for the leaving node's CPUs too and waited out the whole worker-group start timeout (measured: 30 s of a
    40 s recovery) before settling for the survivors."""

    def __init__(self, scaling_config, accepted_sizes: list[int], board=None) -> None:
        super().__init__(scaling_config)
        self._accepted = sorted(accepted_sizes)
        self._board = board  # the run's progress board: where a resize asks the workers for a checkpoint
        self._pending: _PendingResize | None = None
        self._now = time.monotonic
        self._leaving: dict[str, float] = {}  # node seen draining, still on Ray's books -> counts again at (epoch s)
        self._seen: set[str] | None = None  # nodes with reserved resources at the last look (None: no look yet)
        self._warming: dict[str, float] = {}  # joined node -> when its standbys were asked for (monotonic s)
        self._read_failures = 0  # reads of the reserved resources that failed in a row

    def make_decision_for_running_worker_group(self, worker_group_state, worker_group_status):
        """Ray resizes a running group by restarting it from its last checkpoint, which loses every step since.
        So a resize first asks the workers (through the board) for a checkpoint and goes ahead once it is sealed,
        or after SAVE_BEFORE_RESIZE_TIMEOUT_S without one."""
        group = getattr(worker_group_state, "start_time", None)  # which group the pending request was for
        if self._pending is not None and self._pending.group != group:
            self._pending = None  # that group is gone (restarted meanwhile): decide afresh
        if self._pending is None:
            if self._standbys_warming():
                return NoopDecision()
            decision = super().make_decision_for_running_worker_group(worker_group_state, worker_group_status)
            if isinstance(decision, ResizeDecision) and self._shrinks_only_for_leaving(decision, worker_group_state):
                return NoopDecision()
            if not isinstance(decision, ResizeDecision) or self._board is None:
                return decision
            try:
                self._pending = _PendingResize(decision, ray_get(self._board.request_save.remote()), self._now(),
                                               group)
            except Exception:  # the board is gone (the run is ending): resize as Ray would
                return decision
            return NoopDecision()
        decision = self._pending.decision
        try:
            saved = ray_get(self._board.saved_for.remote(self._pending.token))
        except Exception:
            saved = False
        waited = self._now() - self._pending.asked_at
        if not saved and waited < SAVE_BEFORE_RESIZE_TIMEOUT_S:
            return NoopDecision()
        if not saved:
            log.warning("resizing to %d workers without a fresh checkpoint: none sealed within %.0f s",
                        decision.num_workers, waited)
        self._pending = None
        return decision

    def _get_reserved_resources(self):
        """Ray's reservation, against the cluster as it is now. Ray's AutoscalingCoordinator re-reads the node list
        only every 20 s, so a restart just after a node died still counted the dead node (and waited for it), and a
        node that had just joined went unseen for up to 20 s; `recompute=True` re-reads it first (Ray's documented
        use: callers that place workers on the answer). At most once a second, as Ray's own query."""
        now = time.monotonic()
        if now - self._latest_reserved_resources_query_time < self.GET_RESERVED_RESOURCES_INTERVAL_S:
            return self._latest_reserved_resources
        try:
            reserved = ray_get(self._autoscaling_coordinator.get_reserved_resources.remote(self._requester_id,
                                                                                          recompute=True))
        except Exception:  # as Ray's: no decision this time. Said once per outage, not once a second.
            if not self._read_failures:
                log.warning("could not read the reserved resources; no resize decision until they can be read",
                            exc_info=True)
            self._read_failures += 1
            reserved = None
        else:
            if self._read_failures:
                log.warning("reserved resources readable again after %d failed reads", self._read_failures)
            self._read_failures = 0
        self._latest_reserved_resources_query_time = time.monotonic()
        self._latest_reserved_resources = reserved
        return reserved

    def _count_possible_workers(self, reserved_resources) -> int:
        # Remembered: once its deadline has passed a node leaves Ray's draining list, yet stays on its books until
        # the GCS declares it dead; counted then, a resize back to 2 waited out the start timeout for it.
        # Forgotten once Ray no longer lists it at all (declared dead: node ids are never reused), or LEFT_GRACE_S
        # after its deadline (it survived: the reclaim was cancelled).
        now = time.time()
        for node, deadline in draining_nodes().items():
            self._leaving[node] = max(deadline, now) + LEFT_GRACE_S
        self._leaving = {node: until for node, until in self._leaving.items()
                         if node in reserved_resources and now < until}
        staying = {node: res for node, res in reserved_resources.items() if node not in self._leaving}
        self._warm_joined_nodes(staying)
        return self._round_down(super()._count_possible_workers(staying))

    def _shrinks_only_for_leaving(self, decision: ResizeDecision, worker_group_state) -> bool:
        """A running group is not shrunk for a node that is only draining: its workers see the drain notice too,
        checkpoint just in time and train on until their checkpoint right before the deadline, when the group ends
        (`SavedBeforeDeadline`) and Ray restarts it on the nodes that stay (the decision for a group not running
        leaves the draining nodes out). Shrunk at a resize check instead, the group checkpointed and then idled until
        the node was gone (a tiny `chaos --scenario spot` run, 2026-12-06: 11.3 s between two steps, of a 10 s
        notice)."""
        if not self._leaving or decision.num_workers >= worker_group_state.num_workers:
            return False
        reserved = self._latest_reserved_resources or {}
        return self._round_down(super()._count_possible_workers(reserved)) >= worker_group_state.num_workers

    def _round_down(self, possible: int) -> int:
        """The largest accepted world size up to `possible` (0 when none is)."""
        i = bisect.bisect_right(self._accepted, possible)
        return self._accepted[i - 1] if i else 0

    def _standbys_warming(self) -> bool:
        """Looks at the cluster (at most once a second) so that a node that joins gets its standbys as soon as it
        appears, not at the next resize decision; True while some joined node's standbys are still starting."""
        reserved = self._get_reserved_resources()
        if reserved is not None:
            self._warm_joined_nodes({node: res for node, res in reserved.items() if node not in self._leaving})
        return any(self._now() - asked < STANDBY_LEAD_S for asked in self._warming.values())

    def _warm_joined_nodes(self, staying: dict) -> None:
        """A node that joins gets warm standby processes (pipelines/standby.py) as soon as it is seen, so that the
        restart that grows the group onto it does not pay the imports there. The nodes of the first look already
        run workers, which ask for their own."""
        joined = set(staying) - self._seen if self._seen is not None else set()
        self._seen = set(staying)
        if not joined or self._board is None:
            return
        try:
            runtime_env = ray_get(self._board.standby_env.remote())
        except Exception:  # the board is gone: the run is ending
            return
        if runtime_env is None:  # the run keeps no standbys
            return
        from pipelines import standby

        for node in joined:
            count = super()._count_possible_workers({node: staying[node]})
            if count and standby.request(node, runtime_env, count=count):
                self._warming[node] = self._now()
        self._warming = {node: asked for node, asked in self._warming.items() if node in staying}


def ray_get(ref, timeout: float = 5.0):
    import ray

    return ray.get(ref, timeout=timeout)


def draining_nodes() -> dict[str, float]:
    """The nodes Ray Core is draining (a preemption notice, or a scale-down): hex id -> deadline (epoch seconds; 0.0
    for none). Empty when unknown."""
    import ray

    try:
        draining = ray._private.state.state.get_draining_nodes() or {}
    except Exception:  # not connected, or the GCS briefly unreachable: count every node, as Ray would
        return {}
    return {node: (deadline_ms or 0) / 1000 for node, deadline_ms in draining.items()}


class SavedBeforeDeadline(Exception):
    """What every worker of an elastic group raises once its checkpoint before a preemption deadline is sealed: the
    group ends there and Ray Train restarts it at once on the nodes that stay, instead of idling until the node is
    gone and Ray notices (measured on tiny: 1-1.5 s of idling, then 0.4-2.7 s until the restart began).
    `PreemptionAwareFailurePolicy` charges it to the preemption budget, as the node's death would have been."""

    def __init__(self, step: int, preemption_info) -> None:
        super().__init__(step, preemption_info)
        self.step, self.preemption_info = step, preemption_info

    def __str__(self) -> str:
        nodes = ", ".join(node[:12] for node in self.preemption_info.preempted_node_ids)
        return (f"checkpointed step {self.step} before the preemption deadline of node(s) {nodes}; restarting on "
                "the nodes that stay")


class PreemptionAwareFailurePolicy(DefaultFailurePolicy):
    """Ray's failure policy, which also takes a group that ended with `SavedBeforeDeadline` on every failed rank for
    what it is: a preemption (its own retry budget, `max_preemption_failures`), not a failure."""

    def make_decision(self, training_failed_error):
        if isinstance(training_failed_error, WorkerGroupError):
            failures = list(training_failed_error.worker_failures.values())
            if failures and all(isinstance(error, SavedBeforeDeadline) for error in failures):
                training_failed_error = PreemptionError(failures[0].preemption_info, drain_timed_out=False)
        return super().make_decision(training_failed_error)


class ElasticTorchTrainer(TorchTrainer):
    """A TorchTrainer that starts and resizes only at accepted world sizes."""

    def __init__(self, *args, accepted_sizes: list[int], board=None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._accepted_sizes = accepted_sizes
        self._board = board

    def _create_default_callbacks(self):
        callbacks = super()._create_default_callbacks()
        if self._board is not None:
            callbacks.append(GroupStartCallback(self._board))
        if _state_api_available():
            return callbacks
        # Ray's PlacementGroupCleaner asks the state API (served by the dashboard) whether the controller still
        # lives. Without a dashboard (our embedded Ray) every ask fails, so it can never clean anything; it logs a
        # warning a second and the controller's shutdown waits up to 12 s for it to stop.
        return [c for c in callbacks if not isinstance(c, PlacementGroupCleanerCallback)]

    def _initialize_and_run_controller(self, **kwargs):
        if self.scaling_config.elasticity_enabled:
            kwargs["scaling_policy"] = AcceptedSizesScalingPolicy(self.scaling_config, self._accepted_sizes,
                                                                  self._board)
            kwargs["failure_policy"] = PreemptionAwareFailurePolicy(kwargs["failure_policy"].failure_config)
        return super()._initialize_and_run_controller(**kwargs)


class GroupStartCallback(WorkerGroupCallback):
    """Tells the run's progress board when the controller starts creating a worker group, so that each worker can be
    told apart as a warm standby (its process already ran) or a cold start (pipelines/standby.py)."""

    def __init__(self, board) -> None:
        self._board = board

    def before_worker_group_start(self, worker_group_context) -> None:
        self._board.group_starting.remote(time.time())


def _state_api_available() -> bool:
    """Whether this Ray has a dashboard (which serves the state API): `ray start` has one unless told not to."""
    from ray._private.worker import get_dashboard_url

    try:
        return bool(get_dashboard_url())
    except Exception:  # not connected: the trainer connects (and starts Ray's defaults) itself
        return True


def apply_recovery_env(knobs: dict[str, float]) -> None:
    """Set Ray Train's recovery variables in the driver before the trainer starts: Ray propagates them from the
    driver to its controller and workers (ray.train.v2 get_env_vars_to_propagate)."""
    os.environ.update({RECOVERY_ENV[k]: str(v) for k, v in knobs.items() if k in RECOVERY_ENV})
