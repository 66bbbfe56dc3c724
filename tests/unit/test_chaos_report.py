"""The chaos report's recovery time, from the per-step records of a run that restarted (no Ray needed)."""

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


def test_no_new_attempt_after_the_death_means_no_recovery():
    records = _records((1, [(10.0, 0.5), (20.0, 0.5)]))
    assert recovery_s(records, death=15.0) is None
