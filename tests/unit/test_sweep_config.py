"""Sweep YAML: validation with one-line errors, and the expansion into trials (N, D, steps, C, lr). No Ray."""

from __future__ import annotations

import copy
import re

import pytest
import yaml

from app.errors import ConfigError
from app.sweep_config import load_sweep, plan_trials, sweep_from_dict
from tests.conftest import REPO, run_cli

SMOKE = REPO / "tune_configs" / "smoke.yaml"
SMALL = REPO / "tune_configs" / "scaling_small.yaml"


def non_embedding_params(n_layer: int, d: int) -> int:
    """GPT with biases and mlp_ratio 4: per block 12d² + 13d, plus the final LayerNorm (2d)."""
    return n_layer * (12 * d * d + 13 * d) + 2 * d


@pytest.fixture(scope="module")
def smoke_tree() -> dict:
    return yaml.safe_load(SMOKE.read_text())


def sweep_with(tree: dict, change) -> object:
    tree = copy.deepcopy(tree)
    change(tree)
    return plan_trials(sweep_from_dict(tree, "s.yaml"))


# ---- expansion -----------------------------------------------------------------------------------------------


def test_smoke_sweep_expands_to_every_shape_budget_and_seed():
    sweep = load_sweep(SMOKE)
    trials = plan_trials(sweep, storage="/tmp/sweep")
    assert len(trials) == len(sweep.grid.shapes) * len(sweep.grid.budgets) * len(sweep.grid.seeds) == 6
    assert len({t.name for t in trials}) == 6
    per_step = 8 * 64  # tiny preset: global batch 8, context 64
    for t in trials:
        assert t.n_params == non_embedding_params(t.shape.n_layer, t.shape.d_model)
        assert t.tokens == t.steps * per_step and t.tokens in sweep.grid.tokens
        assert t.compute == 6 * t.n_params * t.tokens
        assert t.model_flops == t.flops_per_token * t.tokens > t.compute  # head and attention on top of 6N
        assert t.lr == pytest.approx(3e-3 * 64 / t.shape.d_model)  # lr = base × (d_ref / d_model)^1
        assert t.warmup_steps == round(0.1 * t.steps)
        cfg = t.cfg
        assert (cfg.name, cfg.storage, cfg.steps, cfg.optim.lr) == (t.name, "/tmp/sweep", t.steps, t.lr)
        assert (cfg.model.n_layer, cfg.model.d_model, cfg.model.n_head) == (
            t.shape.n_layer, t.shape.d_model, t.shape.n_head)
        assert (cfg.parallel.workers, cfg.parallel.zero_stage, cfg.eval_every) == ("1", 0, 0)
    flops = [t.model_flops for t in trials]
    assert flops == sorted(flops, reverse=True)  # longest trials first


def test_tokens_per_param_and_flops_budgets(smoke_tree):
    def per_param(tree):
        tree["grid"].pop("tokens")
        tree["grid"]["tokens_per_param"] = [20]

    for t in sweep_with(smoke_tree, per_param):
        assert t.tokens == pytest.approx(20 * t.n_params, abs=8 * 64 / 2)  # rounded to whole steps

    def iso(tree):
        tree["grid"].pop("tokens")
        tree["grid"]["flops"] = [3e10]

    for t in sweep_with(smoke_tree, iso):
        assert t.compute == pytest.approx(3e10, rel=6 * t.n_params * 8 * 64 / 2 / 3e10 + 1e-9)


def test_lr_table_and_seeds(smoke_tree):
    def table(tree):
        tree["lr"] = {"rule": "table", "table": {32: 1e-2, 48: 5e-3, 64: 2e-3}}
        tree["grid"]["seeds"] = [1, 2]

    trials = sweep_with(smoke_tree, table)
    assert len(trials) == 12 and {t.seed for t in trials} == {1, 2}
    assert {t.shape.d_model: t.lr for t in trials} == {32: 1e-2, 48: 5e-3, 64: 2e-3}


def test_lr_factors_train_every_point_at_each_multiple_of_the_rule(smoke_tree):
    plain = sweep_with(smoke_tree, lambda tree: None)
    tuned = sweep_with(smoke_tree, lambda tree: tree["lr"].update(factors=[0.5, 1, 2]))
    assert len(tuned) == 3 * len(plain) and len({t.name for t in tuned}) == len(tuned)
    rule = {(t.shape, t.tokens, t.seed): t.lr for t in plain}
    for t in tuned:
        assert t.lr == pytest.approx(rule[(t.shape, t.tokens, t.seed)] * t.lr_factor)
        assert t.cfg.optim.lr == t.lr and t.name.endswith(f"-x{t.lr_factor:g}")
        assert t.row()["lr_factor"] == t.lr_factor
    assert {t.lr_factor for t in tuned} == {0.5, 1.0, 2.0}
    assert all(t.lr_factor == 1.0 and "-x" not in t.name for t in plain)  # old sweep folders keep their names
    assert load_sweep(REPO / "tune_configs" / "scaling_tuned.yaml").lr.factors == [0.5, 1.0, 2.0]


def test_shipped_scaling_sweeps_share_data_shapes_and_validation_set():
    """scaling_small, scaling_tuned and scaling_b1k differ in budgets, lr factors and batch only: the same data, the
    same shapes and the same 128 validation windows, so their losses compare directly."""
    sweeps = {name: load_sweep(REPO / "tune_configs" / f"{name}.yaml")
              for name in ("scaling_small", "scaling_tuned", "scaling_b1k")}
    plans = {name: plan_trials(sweep) for name, sweep in sweeps.items()}
    windows = {name: {(t.cfg.eval_batches * t.cfg.parallel.micro_batch, t.cfg.model.seq_len) for t in trials}
               for name, trials in plans.items()}
    assert all(w == {(128, 128)} for w in windows.values()), windows
    assert len({tuple(s.grid.shapes) for s in sweeps.values()}) == 1
    assert len({(t.cfg.data.dir, tuple(t.cfg.data.sources)) for trials in plans.values() for t in trials}) == 1
    b1k = plans["scaling_b1k"]
    assert {t.cfg.parallel.global_batch * t.cfg.model.seq_len for t in b1k} == {1024}
    assert len(b1k) == 51 and min(t.steps for t in b1k) >= 400
    assert {t.lr_factor for t in b1k} == {0.5, 1.0, 2.0}
    # scaling_tuned's shape × budget points, each at twice the optimizer steps
    tuned = {(t.shape, t.budget): t for t in plans["scaling_tuned"] if t.lr_factor == 1.0}
    points = {(t.shape, t.budget): t for t in b1k if t.lr_factor == 1.0}
    assert points.keys() == tuned.keys()
    for key, t in points.items():
        assert t.tokens == t.steps * 1024 == pytest.approx(tuned[key].tokens, abs=2048)  # D rounded to whole steps


def test_min_steps_leaves_out_trials_too_short_to_converge(smoke_tree):
    every = sweep_with(smoke_tree, lambda tree: None)
    cut = sorted({t.steps for t in every})[1]  # the shortest trials fall below it

    kept = sweep_with(smoke_tree, lambda tree: tree["grid"].update(min_steps=cut))
    assert {(t.shape, t.tokens) for t in kept} == {(t.shape, t.tokens) for t in every if t.steps >= cut}
    assert 0 < len(kept) < len(every)
    assert [t.index for t in kept] == list(range(len(kept))) and len({t.name for t in kept}) == len(kept)


def test_concurrency_is_capped_by_cpus():
    sweep = load_sweep(SMOKE)
    assert sweep.trials_per_round(2) == 2
    assert sweep.trials_per_round(1) == 1
    assert sweep.trials_per_round(64) == sweep.max_concurrent


def test_shipped_sweeps_validate():
    for path in (SMOKE, SMALL):
        assert plan_trials(load_sweep(path))


# ---- one-line errors -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "change,message",
    [
        (lambda t: t.update(max_concurent=3), "unknown sweep key 'max_concurent'; did you mean 'max_concurrent'?"),
        (lambda t: t["grid"]["shapes"][0].update(d_modle=32),
         "unknown sweep key 'grid.shapes[0].d_modle'; did you mean 'grid.shapes[0].d_model'?"),
        (lambda t: t["grid"]["shapes"][0].update(d_modle=t["grid"]["shapes"][0].pop("d_model")),  # not "missing"
         "unknown sweep key 'grid.shapes[0].d_modle'; did you mean 'grid.shapes[0].d_model'?"),
        (lambda t: t["grid"]["shapes"][0].update(num_layers=2),
         "did you mean 'grid.shapes[0].n_layer'?"),
        (lambda t: t["grid"].update(shapes=[]), "sweep key 'grid.shapes' is empty; list at least one model shape"),
        (lambda t: t["grid"].update(tokens=[]), "sweep key 'grid.tokens' is empty"),
        (lambda t: t["grid"].pop("tokens"), "needs exactly one budget list: tokens, tokens_per_param or flops"),
        (lambda t: t["grid"].update(flops=[1e9]), "(got tokens and flops)"),
        (lambda t: t["grid"]["shapes"][0].update(n_head=3), "d_model=32 is not divisible by n_head=3"),
        (lambda t: t.update(overrides={"model.d_model": 96}), "'model.d_model' is set per trial by the sweep"),
        (lambda t: t.update(overrides={"optim.lr": 1e-3}), "'optim.lr' conflicts with lr.rule=power"),
        (lambda t: t.update(overrides={"model.n_layr": 3}), "unknown config key 'model.n_layr'; did you mean"),
        (lambda t: t["lr"].pop("base"), "sweep key 'lr': rule 'power' needs base"),
        (lambda t: t.update(lr={"rule": "table", "table": {64: 1e-3}}), "lr.table has no entry for d_model=32"),
        (lambda t: t["lr"].update(factors=[]), "sweep key 'lr.factors' is empty; list at least one multiplier"),
        (lambda t: t["lr"].update(factors=[1, 0]), "sweep key 'lr.factors' must be > 0, got [1.0, 0.0]"),
        (lambda t: t["lr"].update(factors=[1, 1.0]), "sweep key 'lr.factors' has repeated values"),
        (lambda t: t.update(max_concurrent=0), "sweep key 'max_concurrent': Input should be greater than or equal"),
        (lambda t: t.pop("max_concurrent"), "sweep key 'max_concurrent' is missing"),
        (lambda t: t["grid"].update(tokens=[100]), "less than one global batch (512 tokens)"),
        (lambda t: t["grid"].update(tokens=[32768, 32800]), "give L2-d64-h4 the same 64 steps"),
        (lambda t: t.update(preset="tinny"), "unknown preset 'tinny'; did you mean 'tiny'?"),
        (lambda t: t["grid"].update(min_steps=10**6), "every trial has fewer than grid.min_steps=1000000 steps"),
        (lambda t: t["grid"].update(min_steps=0), "sweep key 'grid.min_steps': Input should be greater than or"),
        (lambda t: (t.pop("warmup_fraction"), t["grid"].update(tokens=[1024])),
         "has 2 steps but optim.warmup_steps=5; set warmup_fraction"),
    ],
)
def test_bad_sweeps_give_one_line_errors(smoke_tree, change, message):
    with pytest.raises(ConfigError) as err:
        sweep_with(smoke_tree, change)
    text = str(err.value)
    assert message in text
    assert "\n" not in text


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="sweep file .*nope.yaml does not exist"):
        load_sweep(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a list\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_sweep(bad)
    bad.write_text("name: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_sweep(bad)


def test_sweep_cli_reports_a_bad_file_in_one_line(tmp_path):
    tree = yaml.safe_load(SMOKE.read_text())
    tree["grid"]["shapes"] = []
    path = tmp_path / "empty.yaml"
    path.write_text(yaml.safe_dump(tree))
    result = run_cli("sweep", str(path), "--out", str(tmp_path / "out"))
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"error: {path}: sweep key 'grid.shapes' is empty; list at least one model shape, e.g. "
        "{n_layer: 2, d_model: 64, n_head: 4}"]
    assert not (tmp_path / "out").exists()  # refused before anything was written or Ray started


# ---- --reseed: a finished sweep's points at other seeds --------------------------------------------------------


def finished_table(trials, winner: dict | None = None):
    """A results table of `trials`, all ok; each point's run at factor `winner[(shape, tokens)]` has the lowest
    loss (default: the rule's lr, factor 1)."""
    import pandas as pd

    rows = []
    for t in trials:
        best = (winner or {}).get((t.shape, t.tokens), 1.0)
        loss = 3.0 if t.lr_factor == best else 3.0 + 0.1 * (t.index + 1)
        rows.append({**t.row(), "status": "ok", "val_loss": loss})
    return pd.DataFrame(rows)


def test_reseed_trains_each_point_at_other_seeds_at_the_lr_it_chose(smoke_tree):
    from app.sweep_config import plan_reseed

    tree = copy.deepcopy(smoke_tree)
    tree["lr"]["factors"] = [0.5, 1, 2]
    sweep = sweep_from_dict(tree, "s.yaml")
    trials = plan_trials(sweep)
    points = sorted({(t.shape, t.tokens) for t in trials}, key=str)
    winner = {p: (0.5, 1.0, 2.0)[i % 3] for i, p in enumerate(points)}  # every factor wins somewhere
    again = plan_reseed(sweep, finished_table(trials, winner), [1, 2], storage="/tmp/seeds")
    assert len(again) == 2 * len(points) == 12 and len({t.name for t in again}) == 12
    original = {(t.shape, t.tokens, t.lr_factor): t for t in trials}
    for t in again:
        assert t.lr_factor == winner[(t.shape, t.tokens)] and t.seed in (1, 2)
        same = original[(t.shape, t.tokens, t.lr_factor)]  # the run it repeats, seed aside
        assert (t.steps, t.warmup_steps, t.lr, t.n_params) == (same.steps, same.warmup_steps, same.lr, same.n_params)
        assert t.cfg.seed == t.seed and t.cfg.storage == "/tmp/seeds"
        assert t.name.endswith(f"-s{t.seed}-x{t.lr_factor:g}")
    assert [t.model_flops for t in again] == sorted((t.model_flops for t in again), reverse=True)

    plain = plan_trials(load_sweep(SMOKE))  # one factor: names without -x, as the sweep's own
    assert all("-x" not in t.name and t.lr_factor == 1.0 for t in plan_reseed(load_sweep(SMOKE),
                                                                                finished_table(plain), [3]))


@pytest.mark.parametrize("seeds,status,message", [
    ([0], "ok", "--reseed 0: sweep 'smoke' already trains seed 0 (its seeds: 0); pick others"),
    ([1, 1], "ok", "--reseed 1 1: give one or more distinct seeds, e.g. --reseed 1 2"),
    ([], "ok", "give one or more distinct seeds"),
    ([1], "error", "sweep 'smoke': 1 of 6 trials are not finished (first: t002-"),
])
def test_reseed_refuses_clashing_seeds_and_unfinished_sweeps(seeds, status, message):
    from app.sweep_config import plan_reseed

    sweep = load_sweep(SMOKE)
    table = finished_table(plan_trials(sweep))
    table.loc[2, "status"] = status
    with pytest.raises(ConfigError, match=re.escape(message)):
        plan_reseed(sweep, table, seeds)


def test_reseed_cli_mistakes_are_one_line(tmp_path):
    missing = run_cli("sweep", str(SMOKE), "--reseed", "1", "--from", str(tmp_path / "none"))
    assert missing.returncode == 1 and missing.stderr.strip().splitlines() == [
        f"error: --reseed: no finished sweep at {tmp_path / 'none'} (no results.parquet); run `python -m app sweep` "
        "for smoke first, or pass --from DIR"]
    orphan = run_cli("sweep", str(SMOKE), "--from", str(tmp_path))
    assert orphan.returncode == 1 and orphan.stderr.strip().splitlines() == [
        "error: --from names the finished sweep --reseed starts from; add --reseed SEED ..."]
    into_itself = run_cli("sweep", str(SMOKE), "--reseed", "1", "--from", str(tmp_path / "a"), "--out",
                          str(tmp_path / "a"))
    assert into_itself.returncode == 1 and len(into_itself.stderr.strip().splitlines()) == 1
    assert "--reseed writes a new sweep folder, not into the finished sweep" in into_itself.stderr
    assert not any(tmp_path.iterdir())  # each refused before anything was written
