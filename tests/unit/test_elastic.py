"""The elastic trainer: controller callbacks (PlacementGroupCleaner only where a dashboard serves the state API), the
scaling policy (accepted sizes, draining nodes left out, a checkpoint before every resize) and the failure policy (a
group that ended at its checkpoint before a preemption deadline is a preemption)."""

from ray.train import ScalingConfig
from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback
from ray.train.v2._internal.callbacks.backend_setup import BackendSetupCallback

from pipelines.elastic import ElasticTorchTrainer


def _callbacks():
    trainer = ElasticTorchTrainer(lambda: None, accepted_sizes=[1, 2], scaling_config=ScalingConfig(num_workers=2))
    return trainer._create_default_callbacks()


def test_no_placement_group_cleaner_without_a_dashboard(ray_local):
    # It asks the state API whether the controller lives; without a dashboard every ask fails, and stopping it
    # can hold a run's end for up to 12 s.
    callbacks = _callbacks()
    assert not any(isinstance(c, PlacementGroupCleanerCallback) for c in callbacks)
    assert any(isinstance(c, BackendSetupCallback) for c in callbacks)  # the rest stay


def test_placement_group_cleaner_kept_where_a_dashboard_runs(ray_local, monkeypatch):
    monkeypatch.setenv("RAY_OVERRIDE_DASHBOARD_URL", "http://127.0.0.1:8265")
    assert sum(isinstance(c, PlacementGroupCleanerCallback) for c in _callbacks()) == 1


def test_a_draining_node_is_not_counted_for_a_restart(monkeypatch):
    """A reclaimed node stays 'alive' until the GCS misses its health checks; a restart that counted it waited out
    the whole worker-group start timeout. Sizes are also rounded down to what the batch plan accepts."""
    from pipelines import elastic

    policy = elastic.AcceptedSizesScalingPolicy(
        ScalingConfig(num_workers=(1, 4), resources_per_worker={"CPU": 1}), accepted_sizes=[1, 2, 4])
    a, b, c = "a" * 56, "b" * 56, "c" * 56
    nodes = {a: {"CPU": 1.0}, b: {"CPU": 1.0}, c: {"CPU": 1.0}}
    now = [1000.0]
    monkeypatch.setattr(elastic.time, "time", lambda: now[0])
    monkeypatch.setattr(elastic, "draining_nodes", lambda: {})
    assert policy._count_possible_workers(nodes) == 2  # 3 fit; 3 is not accepted
    monkeypatch.setattr(elastic, "draining_nodes", lambda: {b: 1010.0})  # b leaves in 10 s
    assert policy._count_possible_workers(nodes) == 2  # 2 nodes stay
    now[0] = 1015.0
    monkeypatch.setattr(elastic, "draining_nodes", lambda: {c: 0.0})  # c drains without a deadline
    assert policy._count_possible_workers(nodes) == 1  # b passed its deadline: off Ray's draining list, not gone
    monkeypatch.setattr(elastic, "draining_nodes", lambda: {})
    assert policy._count_possible_workers({a: {"CPU": 1.0}, "d" * 56: {"CPU": 1.0}}) == 2  # a new node
    assert policy._leaving == {}  # b and c are off Ray's books: forgotten


def test_a_node_that_outlives_its_deadline_counts_again(monkeypatch):
    """A cancelled reclaim: the node is still there LEFT_GRACE_S after its deadline, so the group may grow onto it."""
    from pipelines import elastic

    policy = elastic.AcceptedSizesScalingPolicy(
        ScalingConfig(num_workers=(1, 2), resources_per_worker={"CPU": 1}), accepted_sizes=[1, 2])
    a, b = "a" * 56, "b" * 56
    nodes = {a: {"CPU": 1.0}, b: {"CPU": 1.0}}
    now = [1000.0]
    monkeypatch.setattr(elastic.time, "time", lambda: now[0])
    monkeypatch.setattr(elastic, "draining_nodes", lambda: {b: 1010.0})
    assert policy._count_possible_workers(nodes) == 1
    monkeypatch.setattr(elastic, "draining_nodes", lambda: {})  # past the deadline, off the draining list
    now[0] = 1010.0 + elastic.LEFT_GRACE_S - 1
    assert policy._count_possible_workers(nodes) == 1  # still expected to go
    now[0] = 1010.0 + elastic.LEFT_GRACE_S
    assert policy._count_possible_workers(nodes) == 2 and policy._leaving == {}


def _policy_reading(get_reserved_resources, monkeypatch):
    """A 1:2 policy whose Ray autoscaling coordinator is `get_reserved_resources(requester, recompute)`."""
    from types import SimpleNamespace

    from pipelines import elastic

    coordinator = SimpleNamespace(get_reserved_resources=SimpleNamespace(remote=get_reserved_resources))
    monkeypatch.setattr(elastic, "ray_get", lambda value, timeout=5.0: value)
    policy = elastic.AcceptedSizesScalingPolicy(
        ScalingConfig(num_workers=(1, 2), resources_per_worker={"CPU": 1}), accepted_sizes=[1, 2])
    policy._requester_id = "train-x"
    policy._coordinator_client = SimpleNamespace(_autoscaling_coordinator=coordinator,
                                                 maybe_send_resource_request=lambda *args: None)
    return policy


def test_the_restart_size_comes_from_a_fresh_view_of_the_cluster(monkeypatch):
    """Ray's coordinator re-reads the node list every 20 s; the policy asks it to re-read first (a dead node not
    counted, a new one seen at once), and no more than once a second."""
    from pipelines import elastic

    calls = []

    def get_reserved_resources(requester, recompute=False):
        calls.append((requester, recompute))
        return {"a" * 56: {"CPU": 1.0}}

    policy = _policy_reading(get_reserved_resources, monkeypatch)
    monkeypatch.setattr(elastic, "draining_nodes", lambda: {})
    decision = policy.make_decision_for_non_running_worker_group()
    assert decision.num_workers == 1
    assert calls == [("train-x", True)]
    policy.make_decision_for_non_running_worker_group()
    assert len(calls) == 1  # within the second: the last answer
    policy._latest_reserved_resources_query_time -= policy.GET_RESERVED_RESOURCES_INTERVAL_S
    policy.make_decision_for_non_running_worker_group()
    assert calls == [("train-x", True)] * 2


def test_an_unreadable_coordinator_is_reported_once_per_outage(monkeypatch, caplog):
    """No resize decision while the coordinator cannot be read (as Ray's own policy), with one warning when that
    starts and one when it ends, not one a second."""
    import logging

    from pipelines import elastic

    up = {"ok": False}

    def get_reserved_resources(requester, recompute=False):
        if not up["ok"]:
            raise ConnectionError("GCS unreachable")
        return {"a" * 56: {"CPU": 1.0}}

    policy = _policy_reading(get_reserved_resources, monkeypatch)
    with caplog.at_level(logging.WARNING, logger=elastic.log.name):
        for _ in range(5):
            policy._latest_reserved_resources_query_time = float("-inf")
            assert policy._get_reserved_resources() is None
        up["ok"] = True
        policy._latest_reserved_resources_query_time = float("-inf")
        assert policy._get_reserved_resources() == {"a" * 56: {"CPU": 1.0}}
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2, messages
    assert "could not read the reserved resources" in messages[0]
    assert messages[1] == "reserved resources readable again after 5 failed reads"


def test_draining_nodes_asks_ray_core(ray_local):
    import ray

    from pipelines.elastic import draining_nodes

    # the call draining_nodes() makes (it swallows errors, so check the API itself is there) and its answer
    assert ray._private.state.state.get_draining_nodes() == {}  # the embedded one-node Ray drains nothing
    assert draining_nodes() == {}


class _Board:
    """The progress board's save-before-resize handshake, in-process."""

    def __init__(self):
        self.requests, self.done = 0, set()

    class _Call:
        def __init__(self, fn):
            self.remote = fn

    @property
    def request_save(self):
        def request():
            self.requests += 1
            return self.requests
        return self._Call(request)

    @property
    def saved_for(self):
        return self._Call(lambda token: token in self.done)


def _policy_growing_once(monkeypatch):
    """Our policy over a Ray policy that decides to grow to 2 once, then sees no change; the board in-process."""
    from ray.train.v2._internal.execution.scaling_policy import ElasticScalingPolicy, NoopDecision, ResizeDecision

    from pipelines import elastic

    board = _Board()
    grow = ResizeDecision(num_workers=2, resources_per_worker={"CPU": 1})
    decisions = iter([grow, NoopDecision()])
    monkeypatch.setattr(ElasticScalingPolicy, "make_decision_for_running_worker_group",
                        lambda self, state, status: next(decisions))
    monkeypatch.setattr(elastic, "ray_get", lambda value, timeout=5.0: value)
    policy = elastic.AcceptedSizesScalingPolicy(
        ScalingConfig(num_workers=(1, 2), resources_per_worker={"CPU": 1}), accepted_sizes=[1, 2], board=board)
    return board, grow, policy


def test_a_resize_waits_for_the_groups_checkpoint(monkeypatch):
    """Ray resizes a running group by restarting it from its last checkpoint; the policy first asks the workers
    for one and passes the resize on only once it is sealed (or after a timeout)."""
    from ray.train.v2._internal.execution.scaling_policy import NoopDecision

    board, grow, policy = _policy_growing_once(monkeypatch)
    assert isinstance(policy.make_decision_for_running_worker_group(None, None), NoopDecision)  # asks first
    assert board.requests == 1
    assert isinstance(policy.make_decision_for_running_worker_group(None, None), NoopDecision)  # not sealed yet
    board.done.add(1)
    assert policy.make_decision_for_running_worker_group(None, None) is grow  # sealed: the resize goes ahead
    assert isinstance(policy.make_decision_for_running_worker_group(None, None), NoopDecision)  # Ray's own again
    assert board.requests == 1


def test_a_pending_resize_is_dropped_when_its_group_restarted_meanwhile(monkeypatch):
    from types import SimpleNamespace

    from ray.train.v2._internal.execution.scaling_policy import NoopDecision

    board, grow, policy = _policy_growing_once(monkeypatch)
    assert isinstance(policy.make_decision_for_running_worker_group(SimpleNamespace(start_time=1.0), None),
                      NoopDecision)  # asked group 1 for a checkpoint
    board.done.add(1)
    # group 1 died and group 2 runs: the old resize is not passed on; Ray's policy decides again (no change)
    assert isinstance(policy.make_decision_for_running_worker_group(SimpleNamespace(start_time=2.0), None),
                      NoopDecision)
    assert policy._pending is None


def test_a_resize_goes_ahead_without_a_checkpoint_after_the_timeout(monkeypatch):
    from ray.train.v2._internal.execution.scaling_policy import ElasticScalingPolicy, NoopDecision, ResizeDecision

    from pipelines import elastic

    board = _Board()
    grow = ResizeDecision(num_workers=2, resources_per_worker={"CPU": 1})
    monkeypatch.setattr(ElasticScalingPolicy, "make_decision_for_running_worker_group",
                        lambda self, state, status: grow)
    monkeypatch.setattr(elastic, "ray_get", lambda value, timeout=5.0: value)
    policy = elastic.AcceptedSizesScalingPolicy(
        ScalingConfig(num_workers=(1, 2), resources_per_worker={"CPU": 1}), accepted_sizes=[1, 2], board=board)
    clock = iter([100.0, 100.0 + elastic.SAVE_BEFORE_RESIZE_TIMEOUT_S - 1, 100.0 + elastic.SAVE_BEFORE_RESIZE_TIMEOUT_S])
    policy._now = lambda: next(clock)
    assert isinstance(policy.make_decision_for_running_worker_group(None, None), NoopDecision)
    assert isinstance(policy.make_decision_for_running_worker_group(None, None), NoopDecision)
    assert policy.make_decision_for_running_worker_group(None, None) is grow  # waited long enough


def test_a_joining_node_gets_warm_standbys_before_the_group_grows_onto_it(monkeypatch):
    """The nodes of the first look run workers, which ask for their own standbys; a node that joins later gets one
    per worker it can hold, with the workers' runtime environment read from the board, and only once."""
    from types import SimpleNamespace

    from pipelines import elastic, standby

    asked = []
    monkeypatch.setattr(standby, "request", lambda node, env, count=1: asked.append((node, env, count)) or True)
    monkeypatch.setattr(elastic, "ray_get", lambda value, timeout=5.0: value)
    monkeypatch.setattr(elastic, "draining_nodes", lambda: {})
    board = SimpleNamespace(standby_env=SimpleNamespace(remote=lambda: '{"env_vars":{"X":"1"}}'))
    policy = elastic.AcceptedSizesScalingPolicy(
        ScalingConfig(num_workers=(1, 4), resources_per_worker={"CPU": 1}), accepted_sizes=[1, 2, 4], board=board)
    a, b, c = "a" * 56, "b" * 56, "c" * 56
    policy._count_possible_workers({a: {"CPU": 1.0}})
    assert asked == []  # the first look: a runs workers already
    policy._count_possible_workers({a: {"CPU": 1.0}, b: {"CPU": 2.0}, c: {"CPU": 0.5}})
    assert asked == [(b, '{"env_vars":{"X":"1"}}', 2)]  # b holds two workers; c none
    policy._count_possible_workers({a: {"CPU": 1.0}, b: {"CPU": 2.0}, c: {"CPU": 0.5}})
    assert len(asked) == 1  # seen before: not asked again


def test_no_standbys_for_a_run_that_keeps_none(monkeypatch):
    from types import SimpleNamespace

    from pipelines import elastic, standby

    asked = []
    monkeypatch.setattr(standby, "request", lambda *args, **kwargs: asked.append(args))
    monkeypatch.setattr(elastic, "ray_get", lambda value, timeout=5.0: value)
    monkeypatch.setattr(elastic, "draining_nodes", lambda: {})
    board = SimpleNamespace(standby_env=SimpleNamespace(remote=lambda: None))  # elastic.warm_standby=false
    policy = elastic.AcceptedSizesScalingPolicy(
        ScalingConfig(num_workers=(1, 2), resources_per_worker={"CPU": 1}), accepted_sizes=[1, 2], board=board)
    policy._count_possible_workers({"a" * 56: {"CPU": 1.0}})
    policy._count_possible_workers({"a" * 56: {"CPU": 1.0}, "b" * 56: {"CPU": 1.0}})
    assert asked == []


def test_the_trainer_tells_the_board_when_each_group_starts(ray_local):
    from types import SimpleNamespace

    from pipelines.elastic import GroupStartCallback

    starts = []
    board = SimpleNamespace(group_starting=SimpleNamespace(remote=starts.append))
    trainer = ElasticTorchTrainer(lambda: None, accepted_sizes=[1, 2], board=board,
                                  scaling_config=ScalingConfig(num_workers=2))
    callbacks = [c for c in trainer._create_default_callbacks() if isinstance(c, GroupStartCallback)]
    assert len(callbacks) == 1
    callbacks[0].before_worker_group_start(None)
    assert len(starts) == 1 and abs(starts[0] - __import__("time").time()) < 5


def test_growing_onto_a_joined_node_waits_for_its_standbys(monkeypatch):
    """The node is seen at the next look (not at the next resize decision) and gets its standbys; the group grows
    onto it only once they have had STANDBY_LEAD_S to start."""
    from types import SimpleNamespace

    from ray.train.v2._internal.execution.scaling_policy import ElasticScalingPolicy, NoopDecision

    from pipelines import elastic, standby

    a, b = "a" * 56, "b" * 56
    cluster = {a: {"CPU": 1.0}}
    policy = _policy_reading(lambda requester, recompute=False: dict(cluster), monkeypatch)
    asked = []
    monkeypatch.setattr(standby, "request", lambda node, env, count=1: asked.append(node) or True)
    monkeypatch.setattr(elastic, "draining_nodes", lambda: {})
    policy._board = SimpleNamespace(standby_env=SimpleNamespace(remote=lambda: "{}"))
    ray_decides = []
    monkeypatch.setattr(ElasticScalingPolicy, "make_decision_for_running_worker_group",
                        lambda self, state, status: ray_decides.append(1) or NoopDecision())
    now = [100.0]
    policy._now = lambda: now[0]
    policy.make_decision_for_non_running_worker_group()  # the first look: a
    policy.make_decision_for_running_worker_group(None, None)
    assert ray_decides == [1] and asked == []
    cluster[b] = {"CPU": 1.0}
    policy._latest_reserved_resources_query_time = 0  # a second later
    assert isinstance(policy.make_decision_for_running_worker_group(None, None), NoopDecision)
    assert asked == [b] and ray_decides == [1]  # b warms: no resize decision yet
    now[0] += elastic.STANDBY_LEAD_S
    policy.make_decision_for_running_worker_group(None, None)
    assert ray_decides == [1, 1]  # warm: Ray's policy may grow the group now


def test_a_running_group_is_not_shrunk_for_a_node_that_is_only_draining(monkeypatch):
    """Its workers handle the notice (just-in-time checkpoint, training on to the deadline); Ray restarts the group
    at the deadline. Once the node is gone from Ray's books, a shrink goes ahead as Ray decides it."""
    from types import SimpleNamespace

    from ray.train.v2._internal.execution.scaling_policy import NoopDecision, ResizeDecision

    from pipelines import elastic

    a, b = "a" * 56, "b" * 56
    cluster = {a: {"CPU": 1.0}, b: {"CPU": 1.0}}
    policy = _policy_reading(lambda requester, recompute=False: dict(cluster), monkeypatch)
    monkeypatch.setattr(elastic.ElasticScalingPolicy, "_maybe_send_resource_request", lambda self: None)
    running = SimpleNamespace(start_time=0.0, num_workers=2)

    def decide():
        policy._latest_monitor_time = policy._latest_reserved_resources_query_time = 0.0  # both due again
        return policy.make_decision_for_running_worker_group(running, None)

    monkeypatch.setattr(elastic, "draining_nodes", lambda: {b: 0.0})
    assert isinstance(decide(), NoopDecision)
    assert set(policy._leaving) == {b} and policy._count_possible_workers(dict(cluster)) == 1  # a restart: without b
    del cluster[b]  # b is gone (and no longer draining): the group must shrink
    monkeypatch.setattr(elastic, "draining_nodes", lambda: {})
    decision = decide()
    assert isinstance(decision, ResizeDecision) and decision.num_workers == 1


def test_a_group_that_saved_before_the_deadline_is_a_preemption_not_a_failure():
    """Every rank of an elastic group raises SavedBeforeDeadline once its checkpoint before the deadline is sealed,
    so that Ray Train restarts it at once; the failure policy charges that to max_preemption_failures."""
    import pickle

    from ray.train import FailureConfig
    from ray.train.v2._internal.execution.failure_handling import FailureDecision
    from ray.train.v2.api.exceptions import WorkerGroupError
    from ray.train.v2.api.preemption import PreemptionInfo

    from pipelines.elastic import PreemptionAwareFailurePolicy, SavedBeforeDeadline

    info = PreemptionInfo(deadline_ms=1_000_000, preempted_node_to_ranks={"b" * 56: [1]})
    saved = pickle.loads(pickle.dumps(SavedBeforeDeadline(120, info)))  # it crosses from a worker to the controller
    assert saved.step == 120 and saved.preemption_info == info
    assert str(saved) == ("checkpointed step 120 before the preemption deadline of node(s) bbbbbbbbbbbb; "
                          "restarting on the nodes that stay")

    def ended(*errors):
        return WorkerGroupError("ended", dict(enumerate(errors)))

    policy = PreemptionAwareFailurePolicy(FailureConfig(max_failures=0, max_preemption_failures=2))
    assert policy.make_decision(ended(saved, saved)) == FailureDecision.RETRY
    assert policy.make_decision(ended(saved)) == FailureDecision.RETRY  # rank 0 raised first: the same
    assert policy.make_decision(ended(saved, saved)) == FailureDecision.RAISE  # a third reclaim: over the budget
    policy = PreemptionAwareFailurePolicy(FailureConfig(max_failures=0, max_preemption_failures=2))
    assert policy.make_decision(ended(saved, RuntimeError("boom"))) == FailureDecision.RAISE  # a real failure


def test_the_elastic_trainer_uses_the_preemption_aware_failure_policy(monkeypatch):
    from ray.train import FailureConfig, RunConfig
    from ray.train.torch import TorchTrainer
    from ray.train.v2._internal.execution.failure_handling import create_failure_policy

    from pipelines.elastic import AcceptedSizesScalingPolicy, PreemptionAwareFailurePolicy

    seen = {}
    monkeypatch.setattr(TorchTrainer, "_initialize_and_run_controller", lambda self, **kwargs: seen.update(kwargs))
    failure = FailureConfig(max_failures=3, max_preemption_failures=7)
    for workers, elastic in (((1, 2), True), (2, False)):
        seen.clear()
        trainer = ElasticTorchTrainer(lambda: None, accepted_sizes=[1, 2], run_config=RunConfig(failure_config=failure),
                                      scaling_config=ScalingConfig(num_workers=workers))
        trainer._initialize_and_run_controller(scaling_policy=None, failure_policy=create_failure_policy(failure))
        assert isinstance(seen["failure_policy"], PreemptionAwareFailurePolicy) == elastic
        assert isinstance(seen["scaling_policy"], AcceptedSizesScalingPolicy) == elastic
        assert seen["failure_policy"].failure_config.max_preemption_failures == 7
