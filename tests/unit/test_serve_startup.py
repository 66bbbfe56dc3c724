"""Start-up checks of serving that need no Ray: the CPUs an application asks for, refused when a Ray started here
cannot place them (Serve itself would wait for them without a word)."""

from __future__ import annotations

import pytest

from app.errors import UserError
from serve_deployments.app import check_cpus, cpu_demand, parse_args


def args(*models: dict, router: dict | None = None):
    return parse_args({"models": [{"name": f"m{i}", "artifact": "x", **m} for i, m in enumerate(models)],
                       "router_ray_actor_options": router})


def test_cpu_demand_counts_every_starting_replica_and_the_router() -> None:
    assert cpu_demand(args({}, {})) == 3  # two models and the router, 1 CPU each by default
    quarter = {"ray_actor_options": {"num_cpus": 0.25}}
    assert cpu_demand(args({**quarter, "num_replicas": 2}, quarter, router={"num_cpus": 0.25})) == 1.0
    assert cpu_demand(args({"autoscaling_config": {"min_replicas": 0, "max_replicas": 4}})) == 1  # scales from 0
    assert cpu_demand(args({"autoscaling_config": {"min_replicas": 1, "initial_replicas": 3, "max_replicas": 4}})) == 4
    assert cpu_demand(args({"autoscaling_config": {"max_replicas": 4}})) == 2  # Serve's min_replicas default, 1


def test_an_application_larger_than_the_ray_started_for_it_is_refused_naming_the_fix() -> None:
    check_cpus(args({}), available=2)  # fits exactly
    with pytest.raises(UserError, match=r"the models and the router ask for 3 CPUs .* this Ray has 2; pass "
                                        r"--num-cpus 3 \(logical CPUs may exceed the cores\)"):
        check_cpus(args({}, {}), available=2)
    with pytest.raises(UserError, match="ask for 2.5 CPUs .* pass --num-cpus 3"):
        check_cpus(args({"ray_actor_options": {"num_cpus": 1.5}}), available=2)
