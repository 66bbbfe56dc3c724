import pytest

from app.errors import ConfigError
from app.parallel import accepted_world_sizes, batch_plan, check_worker_range, memory_estimate


@pytest.mark.parametrize("world", [1, 2, 4, 8])
def test_plan_keeps_global_batch(world):
    plan = batch_plan(global_batch=32, micro_batch=4, world_size=world)
    assert plan.micro_batch * plan.grad_accum * plan.dp == 32
    assert plan.grad_accum == 8 // world


def test_plan_with_pipeline():
    plan = batch_plan(global_batch=16, micro_batch=2, world_size=4, pipeline_stages=2)
    assert (plan.dp, plan.grad_accum, plan.world_size) == (2, 4, 4)


def test_accepted_sizes_exact():
    assert accepted_world_sizes(24, 2, 1, 1, 12) == [1, 2, 3, 4, 6, 12]
    assert accepted_world_sizes(16, 2, 2, 1, 8) == [2, 4, 8]


def test_refused_size_lists_accepted():
    with pytest.raises(ConfigError, match=r"accepts: \[1, 2, 4, 8\]") as err:
        batch_plan(global_batch=16, micro_batch=2, world_size=3)
    assert "parallel.global_batch=16" in str(err.value)


def test_micro_batch_not_dividing_global():
    with pytest.raises(ConfigError, match="parallel.micro_batch=3"):
        batch_plan(global_batch=16, micro_batch=3, world_size=1)


def test_worker_range_without_valid_size():
    with pytest.raises(ConfigError, match=r"parallel.workers=3:3 .* accepted sizes: \[1, 2, 4"):
        check_worker_range(global_batch=8, micro_batch=2, pipeline_stages=1, lo=3, hi=3)
    assert check_worker_range(8, 2, 1, 1, 3) == [1, 2]


def test_memory_zero_stages_shard_more():
    kw = dict(n_params=1_000_000, dp=4, offload_optimizer=False, micro_batch=1, seq_len=8, n_layer=1, d_model=8, n_head=1)
    totals = [memory_estimate(zero_stage=s, **kw) for s in range(4)]
    assert totals[0].optimizer == 8_000_000 and totals[1].optimizer == 2_000_000
    assert totals[1].grads == 4_000_000 and totals[2].grads == 1_000_000
    assert totals[2].params == 4_000_000 and totals[3].params == 1_000_000
    off = memory_estimate(zero_stage=2, **{**kw, "offload_optimizer": True})
    assert off.optimizer == 0 and off.offloaded == 2_000_000
