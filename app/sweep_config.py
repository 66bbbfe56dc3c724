"""Sweep definitions (tune_configs/*.yaml): a validated grid of model shapes × token budgets × seeds → trials.

A sweep names a base preset and overrides shared by every trial, then varies what a scaling law needs: the model
shape (n_layer, d_model, n_head), the training tokens D (absolute, per parameter, or from a compute budget
C = 6ND), the learning rate by size, and the seed. Expanding it is pure (no Ray): `plan_trials` returns one
`TrialSpec` per run with its full `TrainConfig`, N (non-embedding parameters), D, steps and FLOPs.

    sweep = load_sweep("tune_configs/smoke.yaml")
    trials = plan_trials(sweep)          # [TrialSpec, ...], most expensive first
    trials[0].cfg                        # a validated TrainConfig

Each trial runs its whole schedule: steps = round(D / (global_batch × seq_len)) and the cosine decays over exactly
those steps, so every final loss is the end of a complete schedule (no early stopping for scaling data).
"""

from __future__ import annotations

import difflib
import json
import math
import re
import typing
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator

from app.config import _ALIASES, StrictModel, TrainConfig, _yaml, load_config
from app.errors import ConfigError

FLOPS_PER_PARAM_TOKEN = 6.0  # C = 6 N D (app/scaling.py uses the same convention)

# Settings each trial gets from the sweep itself; setting them in `overrides` would be silently ignored.
_PER_TRIAL_KEYS = {
    "name": "trial names are made by the sweep",
    "storage": "trials are stored under the sweep folder (--out)",
    "steps": "steps follow from each trial's token budget (grid.tokens / tokens_per_param / flops)",
    "stop_at": "every trial runs its whole schedule",
    "model.n_layer": "model shapes go in grid.shapes",
    "model.d_model": "model shapes go in grid.shapes",
    "model.n_head": "model shapes go in grid.shapes",
    "parallel.workers": "set resources.workers",
    "parallel.zero_stage": "set resources.zero_stage",
    "parallel.cpus_per_worker": "set resources.cpus_per_worker",
}


class Shape(StrictModel):
    """One model shape of the grid."""

    n_layer: int = Field(gt=0, description="Transformer blocks.")
    d_model: int = Field(gt=0, description="Residual stream width.")
    n_head: int = Field(gt=0, description="Attention heads; must divide d_model.")

    @model_validator(mode="after")
    def _heads_divide_width(self) -> "Shape":
        if self.d_model % self.n_head:
            raise ValueError(f"d_model={self.d_model} is not divisible by n_head={self.n_head}; pick n_head so "
                             "that d_model / n_head is a whole head size")
        return self

    @property
    def label(self) -> str:
        return f"L{self.n_layer}-d{self.d_model}-h{self.n_head}"


def _distinct(values: list, if_empty: str, positive: bool = True) -> list:
    """A grid list's checks: not empty (`if_empty` says what to write), no repeats, and all > 0 unless told not."""
    if not values:
        raise ValueError(f"is empty; {if_empty}")
    if len(set(values)) != len(values):
        raise ValueError(f"has repeated values {values}; list each once")
    if positive and any(not v > 0 for v in values):
        raise ValueError(f"must be > 0, got {values}")
    return values


class Grid(StrictModel):
    """What varies between trials: every shape × every budget × every seed is one trial.

    Give exactly one budget list: ``tokens`` (D per trial), ``tokens_per_param`` (D = k × N, N = non-embedding
    parameters) or ``flops`` (compute budgets C: D = C / 6N, IsoFLOP profiles as in Chinchilla's approach 2).
    """

    shapes: list[Shape] = Field(description="Model shapes (n_layer, d_model, n_head).")
    tokens: list[int] | None = Field(default=None, description="Training tokens D per trial.")
    tokens_per_param: list[float] | None = Field(default=None, description="D as a multiple of N (Chinchilla: ~20).")
    flops: list[float] | None = Field(default=None, description="Compute budgets C = 6ND in FLOPs.")
    seeds: list[int] | None = Field(default=None, description="Model-initialisation seeds (default: the preset's).")
    min_steps: int | None = Field(
        default=None, ge=1, description="Leave out shape × budget pairs that would train for fewer optimizer steps: "
        "a big model on a small budget gets a few dozen steps, stays far from converged, and pulls a fit toward small "
        "models.")

    @field_validator("shapes")
    @classmethod
    def _some_shapes(cls, shapes: list[Shape]) -> list[Shape]:
        if not shapes:
            raise ValueError("is empty; list at least one model shape, e.g. {n_layer: 2, d_model: 64, n_head: 4}")
        if len(set(shapes)) != len(shapes):
            raise ValueError("lists the same shape twice; each shape once (use grid.seeds for repeats)")
        return shapes

    @field_validator("tokens", "tokens_per_param", "flops", "seeds")
    @classmethod
    def _non_empty_unique(cls, values: list | None, info) -> list | None:
        if values is None:
            return values
        return _distinct(values, "list at least one value or leave the key out", positive=info.field_name != "seeds")

    @model_validator(mode="after")
    def _one_budget(self) -> "Grid":
        given = [k for k in ("tokens", "tokens_per_param", "flops") if getattr(self, k) is not None]
        if len(given) != 1:
            got = f"got {' and '.join(given)}" if given else "got none"
            raise ValueError(f"needs exactly one budget list: tokens, tokens_per_param or flops ({got})")
        return self

    @property
    def budget_kind(self) -> str:
        return next(k for k in ("tokens", "tokens_per_param", "flops") if getattr(self, k) is not None)

    @property
    def budgets(self) -> list[float]:
        return list(getattr(self, self.budget_kind))


class LrRule(StrictModel):
    """Peak learning rate per model size.

    ``preset``: the preset's optim.lr for every size. ``power``: lr = base × (d_ref / d_model)^power (μP-style
    width scaling; power 1 halves the lr when the width doubles). ``table``: an explicit lr per d_model.
    ``factors`` tunes the lr per point instead of trusting the rule: every shape × budget × seed trains once per
    factor (lr = rule × factor), and fits keep each point's best run (Chinchilla's and Porian et al.'s practice).
    """

    rule: Literal["preset", "power", "table"] = Field(description="How the lr depends on the model size.")
    base: float | None = Field(default=None, gt=0, description="power: the lr at width d_ref.")
    d_ref: int | None = Field(default=None, gt=0, description="power: reference width.")
    power: float | None = Field(default=None, description="power: exponent on d_ref / d_model.")
    table: dict[int, float] | None = Field(default=None, description="table: d_model -> lr.")
    factors: list[float] = Field(
        default=[1.0], description="Multipliers of the rule's lr, each trained at every point; a fit keeps each "
        "point's lowest loss (per-point lr tuning). [1.0]: the rule's lr only.")

    @field_validator("factors")
    @classmethod
    def _positive_factors(cls, factors: list[float]) -> list[float]:
        return _distinct(factors, "list at least one multiplier, e.g. [1.0] (the rule's lr) or [0.5, 1, 2]")

    @model_validator(mode="after")
    def _fields_match_rule(self) -> "LrRule":
        needs = {"preset": set(), "power": {"base", "d_ref", "power"}, "table": {"table"}}[self.rule]
        given = {k for k in ("base", "d_ref", "power", "table") if getattr(self, k) is not None}
        if needs - given:
            raise ValueError(f"rule '{self.rule}' needs {', '.join(sorted(needs - given))}")
        if given - needs:
            raise ValueError(f"rule '{self.rule}' does not use {', '.join(sorted(given - needs))}; remove it")
        if self.table is not None and any(not lr > 0 for lr in self.table.values()):
            raise ValueError("table learning rates must be > 0")
        return self

    def lr_for(self, d_model: int, preset_lr: float) -> float:
        if self.rule == "power":
            return float(self.base * (self.d_ref / d_model) ** self.power)
        if self.rule == "table":
            if d_model not in self.table:
                raise ConfigError(f"lr.table has no entry for d_model={d_model}; add '{d_model}: LR' "
                                  f"(table has {sorted(self.table)})")
            return float(self.table[d_model])
        return float(preset_lr)


class Resources(StrictModel):
    """Resources of one trial. A one-worker trial trains in its own process (Ray Train's local mode) and holds
    the worker's CPUs; a bigger trial runs a driver that starts one Ray Train TorchTrainer."""

    workers: int = Field(default=1, ge=1, description="Train workers per trial (parallel.workers).")
    cpus_per_worker: int = Field(default=1, ge=1, description="CPUs per Train worker (parallel.cpus_per_worker).")
    zero_stage: Literal[0, 1, 2, 3] = Field(default=0, description="DeepSpeed ZeRO stage (parallel.zero_stage).")
    trial_cpus: float = Field(
        default=0.0, ge=0.0,
        description="CPUs reserved for the trial's driver on top of its workers'. It only waits on its trainer "
        "(or is the one worker), so 0: a trial never holds a core its own workers then wait for.",
    )


class SweepConfig(StrictModel):
    """A sweep: base preset + shared overrides, a grid, an lr rule, resources and concurrency."""

    name: str = Field(min_length=1, description="Sweep name; the default output folder is runs/sweeps/NAME.")
    preset: str = Field(min_length=1, description="Base preset (name or YAML path) every trial starts from.")
    overrides: dict[str, Any] = Field(default_factory=dict,
                                      description="Dotted config keys applied to every trial, e.g. data.dir.")
    grid: Grid
    lr: LrRule = Field(default_factory=lambda: LrRule(rule="preset"), description="Learning rate per size.")
    warmup_fraction: float | None = Field(
        default=None, ge=0.0, lt=1.0,
        description="Warmup as a fraction of each trial's steps (default: the preset's optim.warmup_steps).",
    )
    resources: Resources = Field(default_factory=Resources)
    max_concurrent: int = Field(ge=1, description="Trials running at once (capped by the CPUs Ray has).")

    @field_validator("name")
    @classmethod
    def _safe_name(cls, name: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
            raise ValueError(f"{name!r} may use letters, digits, '_', '.', '-' only (it names a folder)")
        return name

    @model_validator(mode="after")
    def _overrides_are_shared(self) -> "SweepConfig":
        for key in self.overrides:
            if key in _PER_TRIAL_KEYS:
                raise ValueError(f"overrides: '{key}' is set per trial by the sweep; {_PER_TRIAL_KEYS[key]}")
            if key == "optim.lr" and self.lr.rule != "preset":
                raise ValueError(f"overrides: 'optim.lr' conflicts with lr.rule={self.lr.rule}; use lr.rule: preset")
            if key == "optim.warmup_steps" and self.warmup_fraction is not None:
                raise ValueError("overrides: 'optim.warmup_steps' conflicts with warmup_fraction; keep one of them")
            if key == "seed" and self.grid.seeds is not None:
                raise ValueError("overrides: 'seed' conflicts with grid.seeds; keep one of them")
        return self

    def override_strings(self) -> list[str]:
        """`overrides` as KEY=VALUE strings for app.config (JSON values are valid YAML)."""
        return [f"{k}={json.dumps(v)}" for k, v in self.overrides.items()]

    def trials_per_round(self, cluster_cpus: float) -> int:
        """Trials that fit at once on `cluster_cpus`: the YAML's max_concurrent, capped so that every running
        trial's workers hold their CPUs (more would leave trial drivers waiting on workers that cannot start)."""
        r = self.resources
        per_trial = r.workers * r.cpus_per_worker + r.trial_cpus
        return max(1, min(self.max_concurrent, int(cluster_cpus // per_trial)))


# --------------------------------------------------------------------------------------------------------------
# Loading and one-line errors


def _unwrap(annotation: Any) -> Any:
    """list[Shape] / Shape | None / dict[...] → the pydantic model inside, or None."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        inner = _unwrap(arg)
        if inner is not None:
            return inner
    return None


def _dotted(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _unknown_key(loc: tuple) -> str:
    """'grid.shapes[0].d_modle' → the message with the closest key of the same section."""
    model: Any = SweepConfig
    for part in loc[:-1]:
        if isinstance(part, int) or model is None:
            continue
        field = model.model_fields.get(str(part))
        model = _unwrap(field.annotation) if field else None
    leaf = str(loc[-1])
    parent = _dotted(loc[:-1])
    names = list(model.model_fields) if model is not None else []
    alias = _ALIASES.get(leaf)
    close = [alias] if alias in names else difflib.get_close_matches(leaf, names, n=1, cutoff=0.5)
    where = f"{parent}." if parent else ""
    hint = f"did you mean '{where}{close[0]}'?" if close else f"valid keys here: {', '.join(names)}"
    return f"unknown sweep key '{_dotted(loc)}'; {hint}"


def format_sweep_error(err: ValidationError) -> str:
    errors = err.errors()
    # A misspelt key also makes the right one "missing": name the misspelling, it carries the fix.
    first = next((e for e in errors if e["type"] == "extra_forbidden"), errors[0])
    loc = tuple(first["loc"])
    dotted = _dotted(loc)
    if first["type"] == "extra_forbidden":
        return _unknown_key(loc)
    if first["type"] == "missing":
        return f"sweep key '{dotted}' is missing; add it (see tune_configs/smoke.yaml)"
    msg = first["msg"].removeprefix("Value error, ")
    if not dotted:
        return msg
    got = first.get("input")
    shown = "" if isinstance(got, (dict, list)) else f" (got {got!r})"
    return f"sweep key '{dotted}' {msg}" if msg.startswith(("is ", "has ", "lists ", "must ", "needs ")) else \
        f"sweep key '{dotted}': {msg}{shown}"


def sweep_from_dict(tree: dict[str, Any], source: str = "sweep") -> SweepConfig:
    try:
        return SweepConfig.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(f"{source}: {format_sweep_error(err)}") from None


def load_sweep(path: str | Path) -> SweepConfig:
    """Read and validate a sweep YAML; every mistake is one ConfigError line naming the file and the key."""
    path = Path(path)
    if not path.is_file():
        examples = sorted(p.name for p in Path("tune_configs").glob("*.yaml")) if Path("tune_configs").is_dir() else []
        hint = f" (e.g. tune_configs/{examples[0]})" if examples else ""
        raise ConfigError(f"sweep file {path} does not exist; pass a sweep YAML{hint}")
    try:
        tree = _yaml(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: expected a mapping (name, preset, grid, ...) at the top level")
    return sweep_from_dict(tree, str(path))


# --------------------------------------------------------------------------------------------------------------
# Expansion into trials


@dataclass(frozen=True)
class TrialSpec:
    """One training run of a sweep. Units: tokens, parameters, FLOPs."""

    index: int
    name: str
    shape: Shape
    seed: int
    lr: float
    steps: int
    warmup_steps: int
    tokens: int  # D actually trained: steps × global_batch × seq_len
    n_params: int  # N: non-embedding parameters (model.num_params(non_embedding=True))
    n_params_total: int
    flops_per_token: int  # the model's own training FLOPs per token (model.flops_per_token())
    budget: float  # the grid value this trial came from (tokens, tokens per parameter, or FLOPs)
    cfg: TrainConfig
    lr_factor: float = 1.0  # lr = the rule's lr × this (lr.factors)

    @property
    def compute(self) -> float:
        """C = 6 N D in FLOPs (the scaling-law convention)."""
        return FLOPS_PER_PARAM_TOKEN * self.n_params * self.tokens

    @property
    def model_flops(self) -> float:
        """The model's own training FLOPs for D tokens (includes the output head and attention)."""
        return float(self.flops_per_token) * self.tokens

    def row(self) -> dict[str, Any]:
        s = self.shape
        return {"trial": self.name, "n_layer": s.n_layer, "d_model": s.d_model, "n_head": s.n_head,
                "seed": self.seed, "lr": self.lr, "lr_factor": self.lr_factor, "steps": self.steps,
                "tokens": self.tokens,
                "n_params": self.n_params, "n_params_total": self.n_params_total,
                "flops_per_token": self.flops_per_token, "compute": self.compute, "model_flops": self.model_flops,
                "budget": self.budget}


def model_size(cfg: TrainConfig) -> tuple[int, int, int]:
    """(non-embedding params, total params, training FLOPs per token) of cfg's GPT, built on the meta device."""
    import torch

    from app.model import GPT

    with torch.device("meta"):
        model = GPT(cfg.model)
    return model.num_params(non_embedding=True), model.num_params(non_embedding=False), model.flops_per_token()


def make_trial(sweep: SweepConfig, base: TrainConfig, shape: Shape, seed: int, *, tokens: float | None = None,
               tokens_per_param: float | None = None, flops: float | None = None, index: int = 0,
               storage: str | None = None, name: str | None = None, lr_factor: float = 1.0) -> TrialSpec:
    """One trial of `sweep` at `shape` with one budget (tokens, tokens per parameter, or FLOPs C = 6ND), at
    `lr_factor` × the lr rule's learning rate."""
    tree = base.model_dump()
    tree["model"].update(n_layer=shape.n_layer, d_model=shape.d_model, n_head=shape.n_head)
    tree["seed"] = seed
    sized = TrainConfig.model_validate(tree)
    n_params, n_total, fpt = model_size(sized)
    budget = next(b for b in (tokens, tokens_per_param, flops) if b is not None)
    if tokens is not None:
        target = float(tokens)
    elif tokens_per_param is not None:
        target = tokens_per_param * n_params
    else:
        target = flops / (FLOPS_PER_PARAM_TOKEN * n_params)
    per_step = base.parallel.global_batch * base.model.seq_len
    steps = round(target / per_step)
    label = f"{shape.label}, budget {budget:g}"
    if steps < 1:
        raise ConfigError(f"sweep '{sweep.name}': trial {label} wants {target:,.0f} tokens, less than one global "
                          f"batch ({per_step:,} tokens); raise the budget or lower parallel.global_batch")
    if sweep.warmup_fraction is not None:
        warmup = min(steps, max(1, round(sweep.warmup_fraction * steps))) if sweep.warmup_fraction else 0
    else:
        warmup = base.optim.warmup_steps
        if warmup > steps:
            raise ConfigError(f"sweep '{sweep.name}': trial {label} has {steps} steps but optim.warmup_steps="
                              f"{warmup}; set warmup_fraction (e.g. 0.1) in the sweep or lower optim.warmup_steps")
    try:
        lr = sweep.lr.lr_for(shape.d_model, base.optim.lr) * lr_factor
    except ConfigError as err:
        raise ConfigError(f"sweep '{sweep.name}': {err}") from None
    name = name or f"t{index:03d}-{shape.label}-D{steps * per_step}-s{seed}"
    tree["name"] = name
    tree["steps"] = steps
    tree["stop_at"] = None
    tree["optim"].update(lr=lr, warmup_steps=warmup)
    if storage is not None:
        tree["storage"] = storage
    try:
        cfg = TrainConfig.model_validate(tree)
    except ValidationError as err:
        from app.config import format_validation_error

        raise ConfigError(f"sweep '{sweep.name}': trial {label}: {format_validation_error(err)}") from None
    return TrialSpec(index=index, name=name, shape=shape, seed=seed, lr=lr, steps=steps, warmup_steps=warmup,
                     tokens=steps * per_step, n_params=n_params, n_params_total=n_total, flops_per_token=fpt,
                     budget=float(budget), cfg=cfg, lr_factor=float(lr_factor))


def base_config(sweep: SweepConfig, extra_overrides: list[str] | tuple[str, ...] = (), source: str | None = None
                ) -> TrainConfig:
    """The preset with the sweep's shared overrides (and any `extra_overrides` KEY=VALUE) applied."""
    for text in extra_overrides:
        key = text.partition("=")[0].strip()
        if key in _PER_TRIAL_KEYS:
            raise ConfigError(f"--set {key}: set per trial by the sweep; {_PER_TRIAL_KEYS[key]}")
    r = sweep.resources
    resources = [f"parallel.workers={r.workers}", f"parallel.zero_stage={r.zero_stage}",
                 f"parallel.cpus_per_worker={r.cpus_per_worker}"]
    try:
        return load_config(sweep.preset, resources + sweep.override_strings() + list(extra_overrides))
    except ConfigError as err:
        raise ConfigError(f"{source or f'sweep {sweep.name!r}'}: {err}") from None


def plan_trials(sweep: SweepConfig, extra_overrides: list[str] | tuple[str, ...] = (), *,
                storage: str | None = None) -> list[TrialSpec]:
    """Every shape × budget × seed × lr factor as a TrialSpec, most expensive (model FLOPs) first so that the
    longest runs start early and the sweep's last round is short. Names are unique and stable for a given sweep
    (`-x<factor>` ends them when lr.factors lists several)."""
    base = base_config(sweep, extra_overrides)
    seeds = sweep.grid.seeds or [base.seed]
    kind = sweep.grid.budget_kind
    specs = [make_trial(sweep, base, shape, seed, storage=storage, lr_factor=factor, **{kind: budget})
             for shape in sweep.grid.shapes for budget in sweep.grid.budgets for seed in seeds
             for factor in sweep.lr.factors]
    if sweep.grid.min_steps is not None:
        specs = [s for s in specs if s.steps >= sweep.grid.min_steps]
        if not specs:
            raise ConfigError(f"sweep '{sweep.name}': every trial has fewer than grid.min_steps="
                              f"{sweep.grid.min_steps} steps; raise the budgets or lower min_steps")
    return _numbered(sweep, specs)


def _numbered(sweep: SweepConfig, specs: list[TrialSpec]) -> list[TrialSpec]:
    """Sort most expensive first, name `t<index>-<shape>-D<tokens>-s<seed>[-x<factor>]`, and refuse two budgets
    that round to the same steps."""
    specs = sorted(specs, key=lambda s: -s.model_flops)  # stable: grid order among equals
    out = []
    for index, s in enumerate(specs):
        name = f"t{index:03d}-{s.shape.label}-D{s.tokens}-s{s.seed}"
        name += f"-x{s.lr_factor:g}" if len(sweep.lr.factors) > 1 else ""
        out.append(replace(s, index=index, name=name, cfg=s.cfg.model_copy(update={"name": name})))
    seen: dict[tuple, float] = {}
    for t in out:
        key = (t.shape, t.tokens, t.seed, t.lr_factor)
        if key in seen:
            raise ConfigError(f"sweep '{sweep.name}': grid.{sweep.grid.budget_kind} values {seen[key]:g} and "
                              f"{t.budget:g} give {t.shape.label} the same {t.steps} steps; spread the budgets "
                              "further apart")
        seen[key] = t.budget
    return out


def plan_reseed(sweep: SweepConfig, finished: Any, seeds: list[int],
                extra_overrides: list[str] | tuple[str, ...] = (), *, storage: str | None = None) -> list[TrialSpec]:
    """The points (shape × budget) of a finished sweep trained again at other ``seeds``, each at the lr factor it
    chose: the factor of its lowest-loss run at the sweep's first seed (with one factor, that one). ``finished``
    is the sweep's results table (a DataFrame, e.g. its results.parquet). Fitted together with the sweep
    (``python -m app fit A A-seeds --seed-spread``) every point then has several seeds at one lr, with no lr
    re-tuned per seed. Raises ConfigError for a seed the sweep already has or a sweep not yet finished."""
    if not seeds or len(set(seeds)) != len(seeds):
        raise ConfigError(f"--reseed {' '.join(map(str, seeds))}: give one or more distinct seeds, e.g. --reseed 1 2")
    planned = plan_trials(sweep, extra_overrides)
    have = sorted({t.seed for t in planned})
    if clash := sorted(set(seeds) & set(have)):
        raise ConfigError(f"--reseed {clash[0]}: sweep '{sweep.name}' already trains seed {clash[0]} (its seeds: "
                          f"{', '.join(map(str, have))}); pick others")
    status = dict(zip(finished["trial"], finished["status"])) if "status" in finished.columns else {}
    loss = dict(zip(finished["trial"], finished["val_loss"]))
    missing = [t.name for t in planned if status.get(t.name) != "ok"]
    if missing:
        raise ConfigError(f"sweep '{sweep.name}': {len(missing)} of {len(planned)} trials are not finished (first: "
                          f"{missing[0]}); run `python -m app sweep` on it to the end before --reseed")
    best: dict[tuple, TrialSpec] = {}  # (shape, budget) -> the run it keeps at the first seed
    for t in planned:
        key = (t.shape, t.budget)
        if t.seed == have[0] and (key not in best or loss[t.name] < loss[best[key].name]):
            best[key] = t
    base = base_config(sweep, extra_overrides)
    kind = sweep.grid.budget_kind
    specs = [make_trial(sweep, base, t.shape, seed, storage=storage, lr_factor=t.lr_factor, **{kind: t.budget})
             for t in best.values() for seed in seeds]
    return _numbered(sweep, specs)


def total_model_flops(trials: list[TrialSpec]) -> float:
    return math.fsum(t.model_flops for t in trials)
