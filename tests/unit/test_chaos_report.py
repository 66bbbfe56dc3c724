"""The chaos harness without a cluster: recovery time from per-step records, and faults refused up front."""

from pipelines.chaos import recovery_s


def _records(*attempts):
    """(attempt, [(end time, step seconds), ...]) → board records."""
    return [{"attempt": a, "time": t, "step_time_s": dt} for a, steps in attempts for t, dt in steps]


def test_recovery_is_death_to_the_start_of_the_new_groups_first_step():
    records = _records((1, [(10.0, 0.5), (10.5, 0.5)]), (2, [(25.0, 2.0), (25.5, 0.5)]))
    assert recovery_s(records, death=11.0) == 25.0 - 2.0 - 11.0


def test_each_of_several_faults_is_measured_from_its_own_death():
    records = _records((1, [(10.0, 0.5)]), (2, [(30.0, 1.0), (40.0, 1.0)]), (3, [(60.0, 1.0)]))
    assert recovery_s(records, death=12.0) == 17.0  # attempt 2's first step started at 29
    assert recovery_s(records, death=45.0) == 14.0  # attempt 3's at 59, not attempt 2's later steps


def test_after_a_notice_recovery_counts_from_when_the_noticed_group_stopped():
    # the group checkpointed before the deadline at 20 and ended; the new one trained before the node died at 22
    records = _records((1, [(10.0, 0.5), (20.0, 0.5)]), (2, [(21.5, 0.5), (22.5, 0.5)]))
    assert recovery_s(records, death=22.0, notice=12.0) == 21.0 - 20.0
    assert recovery_s(records, death=22.0) is None  # measured from the death alone, attempt 2 was already running
    # a group that trained on until the node died: from the death
    records = _records((1, [(10.0, 0.5), (21.9, 0.5)]), (2, [(25.0, 1.0)]))
    assert recovery_s(records, death=21.0, notice=12.0) == 24.0 - 21.0


def test_no_new_attempt_after_the_death_means_no_recovery():
    records = _records((1, [(10.0, 0.5), (20.0, 0.5)]))
    assert recovery_s(records, death=15.0) is None


def test_impossible_faults_are_refused_before_any_cluster_starts(tmp_path):
    import pytest

    from app.config import load_config
    from app.errors import ConfigError
    from pipelines import chaos

    cfg = load_config("tiny", ["steps=100", "checkpoint.every_steps=50"])
    with pytest.raises(ConfigError, match="--inject-at-step 20: torn-checkpoint damages the newest checkpoint, "
                                          "and the first comes at step 50"):
        chaos.run(cfg, "torn-checkpoint", out=tmp_path, inject_at_step=20)
    for step in (100, 0):  # 0 used to mean "the default step"
        with pytest.raises(ConfigError, match=f"--inject-at-step {step} must lie inside the run's 100 steps"):
            chaos.run(cfg, "spot", out=tmp_path, inject_at_step=step)
    with pytest.raises(ConfigError, match="needs parallel.workers >= 2"):
        chaos.run(cfg.model_copy(update={"parallel": cfg.parallel.model_copy(update={"workers": "1"})}), "spot",
                  out=tmp_path)
    with pytest.raises(ConfigError, match="--scenario 'flood' is not one of"):
        chaos.run(cfg, "flood", out=tmp_path)
    with pytest.raises(ConfigError, match=r"--notice -1: a drain notice needs a deadline at least 1 s away"):
        chaos.run(cfg, "spot", out=tmp_path, notice_s=-1)  # it used to crash the harness after both runs
    with pytest.raises(ConfigError, match="rejoin_after_s=-2: a node cannot rejoin before it left"):
        chaos.run(cfg, "kill-node", out=tmp_path, rejoin_after_s=-2)
    assert not any(tmp_path.iterdir())  # refused before anything was written
