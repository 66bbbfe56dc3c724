"""How the training workers agree between steps (pipelines/train.py): how many steps apart (`_sync_gap`) and what
one agreement carries (`_agree`, a real all-gather between two gloo processes); and how each step is seeded."""

import json

import pytest
import torch.multiprocessing as mp

from pipelines.ray_session import free_port
from pipelines.train import MAX_SYNC_GAP, SYNC_INTERVAL_S, _agree, _seed_step, _sync_gap


def test_a_step_draws_what_torch_manual_seed_would_give_it():
    """Dropout masks (and anything else a CPU step draws) come out as under torch.manual_seed, so runs checkpointed
    before the cheaper seeding resume onto the same trajectory."""
    import torch

    drop = torch.nn.Dropout(0.5)
    ones = torch.ones(4096)
    torch.manual_seed(12345)
    reference = drop(ones)
    _seed_step(999, torch.device("cpu"))
    other = drop(ones)
    _seed_step(12345, torch.device("cpu"))
    assert torch.equal(drop(ones), reference) and not torch.equal(other, reference)


def test_agreements_come_about_every_sync_interval():
    step_s = SYNC_INTERVAL_S / 10
    assert _sync_gap([step_s * 0.9, step_s, step_s * 5], notice=None) == 10  # the median step, not the slow one
    assert _sync_gap([SYNC_INTERVAL_S * 3], notice=None) == 1  # slow steps: every step
    assert _sync_gap([1e-5], notice=None) == MAX_SYNC_GAP  # bounded: the records still arrive often
    assert _sync_gap([step_s], notice=object()) == 1  # a drain notice: the deadline is counted in steps


def _rank(rank: int, port: int, out: str) -> None:
    import os

    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        # Three steps since the last agreement; rank r trained windows 100*s + 10*r + {0,1} at step s.
        steps = [(1.0 + rank + s, 0.1 * (rank + 1), 0.0) for s in range(3)]
        ids = [[100 * s + 10 * rank, 100 * s + 10 * rank + 1] for s in range(3)]
        decisions, per_step, sample_ids = _agree([7.0 + rank, 2.0], steps, ids, dp_rank=rank, world=2)
        with open(f"{out}.{rank}", "w") as f:
            json.dump({"decisions": decisions.tolist(), "per_step": per_step.tolist(), "ids": sample_ids}, f)
    finally:
        dist.destroy_process_group()


@pytest.mark.timeout(120)
def test_one_agreement_carries_every_ranks_steps_and_samples(tmp_path):
    out = str(tmp_path / "agreed")
    mp.spawn(_rank, args=(free_port(), out), nprocs=2)
    seen = [json.loads((tmp_path / f"agreed.{r}").read_text()) for r in (0, 1)]
    assert seen[0] == seen[1]  # every rank sees the same table: they take the same branches
    got = seen[0]
    assert got["decisions"] == [[7.0, 2.0], [8.0, 2.0]]  # in rank order: rank 0's row decides
    assert got["per_step"][2] == [[3.0, 0.1, 0.0], [4.0, 0.2, 0.0]]  # step 3: both ranks' loss and step time
    assert got["ids"] == [[0, 1, 10, 11], [100, 101, 110, 111], [200, 201, 210, 211]]  # per step, dp-rank order
