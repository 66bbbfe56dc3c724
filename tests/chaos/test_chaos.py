"""Faults injected into training on a local multi-node Ray cluster (head + 2 worker raylets on this machine).

Each scenario is compared with one undisturbed reference run of the same config: same samples, same losses.
"""

import pytest

from app.config import load_config
from pipelines import chaos

pytestmark = [pytest.mark.chaos, pytest.mark.slow]

STEPS = 300


@pytest.fixture(scope="module")
def chaos_cfg(tiny_data, tmp_path_factory):
    import ray

    ray.shutdown()  # the harness starts its own multi-node cluster; the session's embedded Ray must not linger
    return load_config("tiny", [f"data.dir={tiny_data}", f"steps={STEPS}", "checkpoint.every_steps=50",
                                "log_every=50", "eval_every=0"])


@pytest.fixture(scope="module")
def shared():
    """The undisturbed reference run, measured by the first scenario's harness and reused by the others."""
    return {}


def _run(chaos_cfg, shared, tmp_path, scenario, **kw):
    result = chaos.run(chaos_cfg, scenario, out=tmp_path, reference=shared.get("reference"), **kw)
    shared["reference"] = result.reference
    return result


def test_spot_reclaim_loses_no_step_and_finishes_on_survivor(chaos_cfg, shared, tmp_path):
    result = _run(chaos_cfg, shared, tmp_path, "spot", inject_at_step=60, notice_s=4, rejoin_after_s=None)
    r = result.report
    assert r["lost_steps"] == 0  # notice → just-in-time checkpoint → final checkpoint before the deadline
    assert r["duplicated_samples"] == 0 and r["skipped_samples"] == 0
    assert r["world_sizes"] == [2, 1] and r["restarts"] == 1  # finished on the surviving node
    assert r["resumed_from_steps"][1] >= 60 and r["steps"] == STEPS
    assert r["max_rel_loss_diff_vs_reference"] < 1e-3  # world size 1 reduces in another order: ~1e-7
    assert r["recovery_s"] is not None and r["recovery_s"] > 0
    assert r["warm_standby_workers"][1:] == ["1/1"]  # the survivor's standby, asked for when the first group trained
    # one checkpoint on the notice, one right before the deadline, where the first group ended (SavedBeforeDeadline)
    # and the survivor resumed; any other save in between was a periodic one
    history = result.disturbed.history
    kinds = history["checkpoint"].dropna()
    assert list(kinds).count("just-in-time") == 1 and list(kinds).count("final-before-deadline") == 1
    assert r["resumed_from_steps"][1] == int(history.loc[kinds[kinds == "final-before-deadline"].index[0], "step"])
    assert result.path.is_file()


def test_killed_worker_recomputes_only_since_last_checkpoint(chaos_cfg, shared, tmp_path):
    r = _run(chaos_cfg, shared, tmp_path, "kill-worker", inject_at_step=80).report
    assert r["restarts"] == 1 and r["resumed_from_steps"] == [0, 50]
    assert 0 < r["lost_steps"] < 50 + 20  # steps after the step-50 checkpoint, until the death was noticed
    assert r["duplicated_samples"] == 0 and r["skipped_samples"] == 0
    assert r["max_rel_loss_diff_vs_reference"] < 1e-6  # same world size: bit-for-bit the same trajectory
    # both first workers and both replacements were warm processes, not cold starts (the first group's standbys
    # prove pipelines.standby.expected_worker_env predicts the runtime environment Ray Train gives its workers)
    assert r["warm_standby_workers"] == ["2/2", "2/2"]


def test_torn_checkpoint_falls_back_to_previous_good_one(chaos_cfg, shared, tmp_path):
    r = _run(chaos_cfg, shared, tmp_path, "torn-checkpoint", inject_at_step=120).report
    assert r["damaged_checkpoint_step"] == 100
    assert r["resumed_from_steps"] == [0, 50]  # step 100 lost a shard: skipped for step 50
    assert r["duplicated_samples"] == 0 and r["skipped_samples"] == 0
    assert r["max_rel_loss_diff_vs_reference"] < 1e-6


def test_lost_node_without_replacement_restarts_on_the_survivor(chaos_cfg, shared, tmp_path):
    """No notice and no node coming back: the dead node must drop off the policy's view (GCS health checks, a fresh
    coordinator read) so the group restarts at size 1 from the last checkpoint."""
    r = _run(chaos_cfg, shared, tmp_path, "kill-node", inject_at_step=80, rejoin_after_s=None).report
    assert r["world_sizes"] == [2, 1] and r["restarts"] == 1
    # from the newest checkpoint before the loss (every 50 steps; the node goes once the run reports step 80+)
    assert r["resumed_from_steps"][0] == 0 and r["resumed_from_steps"][1] in (50, 100) and r["steps"] == STEPS
    # the steps since that checkpoint are recomputed: at least 30 from step 50 (the loss comes after step 80), and
    # possibly none from step 100 (a loss right after its save; seen once in CI-sized runs)
    assert r["lost_steps"] < 50 + 20
    if r["resumed_from_steps"][1] == 50:
        assert r["lost_steps"] >= 30
    assert r["duplicated_samples"] == 0 and r["skipped_samples"] == 0
    assert r["max_rel_loss_diff_vs_reference"] < 1e-3  # world size 1 reduces in another order
