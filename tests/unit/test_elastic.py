"""The trainer's controller callbacks: Ray's PlacementGroupCleaner only where a dashboard serves the state API."""

import pytest
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
