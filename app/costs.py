"""Training cost model: instance prices, goodput under preemption, wall hours and USD, Young–Daly checkpoint interval.

Pure Python + numpy/scipy (pyyaml for the price file); no Ray. Times are in seconds unless a name says hours,
rates of failures are per hour of wall time, money is USD, compute is FLOPs with C = 6 N D.

Goodput model. A run writes a checkpoint after every tau seconds of work; each save stalls training for S
seconds. Failures (spot preemptions, node faults) arrive at random, lambda per second for the whole job (any lost
instance restarts the worker group). Each failure costs a restart R (reschedule, start workers, load the
checkpoint) plus the work done since the last checkpoint, tau/2 on average. Per second of wall time the fraction
lambda (R + tau/2) goes to failures; the rest splits between work and saving in the ratio tau : S, so

    goodput = tau / (tau + S) × (1 − lambda (R + tau/2))        (clamped at 0)

— productive seconds over wall seconds, the same ratio the training goodput ledger measures. The model is first
order in lambda·tau, the regime of Young (1974) and Daly (2006); minimising its waste S/tau + lambda tau/2 gives
their interval tau* = sqrt(2 S M), M = 1/lambda the mean time between failures.

    plan = plan_training(fit, compute_flops=1e21, instance="g6e.xlarge", spot=True, workers=4,
                         tokens_per_second_per_worker=9e4, preemptions_per_hour=0.05)
    plan.to_dict()
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import yaml
from scipy.optimize import brentq

from app.jsonsafe import finite
from app.scaling import FLOPS_PER_PARAM_TOKEN, LONG_EXTRAPOLATION, ScalingFit

DEFAULT_PRICES = Path(__file__).with_name("prices.yaml")


# --------------------------------------------------------------------------------------------------------------
# Throughput from measured runs
# --------------------------------------------------------------------------------------------------------------


def throughput_at(flops_per_token: float, measured: list[tuple[float, float]]) -> float:
    """Tokens/s a model costing `flops_per_token` should train at, from runs of other sizes measured on the same
    hardware: `measured` holds (flops_per_token, tokens/s) pairs, several per size allowed (their median counts).

    Small models do not keep the hardware's FLOP/s (per-step overhead weighs more, matmuls are thinner), so the
    achieved FLOP/s (tokens/s × flops_per_token) is interpolated linearly in log(flops_per_token) between the two
    measured sizes around the target, and held at the nearest one beyond them."""
    import numpy as np

    if not measured:
        raise ValueError("throughput_at needs at least one (flops_per_token, tokens/s) measurement")
    if flops_per_token <= 0 or any(f <= 0 or t <= 0 for f, t in measured):
        raise ValueError("flops_per_token and every measured (flops_per_token, tokens/s) must be > 0")
    by_size: dict[float, list[float]] = {}
    for f, t in measured:
        by_size.setdefault(float(f), []).append(float(f) * float(t))
    sizes = sorted(by_size)
    flops_per_s = [float(np.median(by_size[f])) for f in sizes]
    achieved = float(np.interp(math.log(flops_per_token), [math.log(f) for f in sizes], flops_per_s))
    return achieved / flops_per_token


# --------------------------------------------------------------------------------------------------------------
# Checkpoint interval and goodput
# --------------------------------------------------------------------------------------------------------------


def young_daly_interval(save_seconds: float, mtbf_seconds: float) -> float:
    """Young–Daly checkpoint interval sqrt(2 × save time × MTBF), in seconds of work between checkpoints.

    ``mtbf_seconds`` is the job's mean time between failures; ``math.inf`` (no failures) gives ``math.inf``.
    """
    if save_seconds <= 0 or mtbf_seconds <= 0:
        raise ValueError(
            f"young_daly_interval needs save_seconds > 0 and mtbf_seconds > 0, got {save_seconds} and {mtbf_seconds}"
        )
    return math.sqrt(2.0 * save_seconds * mtbf_seconds)


def auto_checkpoint_interval(save_seconds: float | None, step_seconds: float, mtbf_seconds: float) -> float:
    """Seconds between checkpoints for `checkpoint.every_minutes: auto`: Young–Daly from the measured save time.
    Before a save has been measured, ten step times stand in for it (a full-state save on one machine)."""
    measured = save_seconds if save_seconds and save_seconds > 0 else 10.0 * step_seconds
    return young_daly_interval(max(measured, 1e-3), mtbf_seconds)


def expected_goodput(
    checkpoint_interval_s: float, save_seconds: float, restart_seconds: float, failures_per_hour: float
) -> float:
    """Expected fraction of wall time spent on productive training (see the module docstring for the model).

    ``failures_per_hour`` is the rate for the whole job. Returns a value in [0, 1]; 0 means failures eat all time.
    """
    if checkpoint_interval_s <= 0:
        raise ValueError(f"checkpoint_interval_s must be > 0, got {checkpoint_interval_s}")
    if save_seconds < 0 or restart_seconds < 0 or failures_per_hour < 0:
        raise ValueError(
            "save_seconds, restart_seconds and failures_per_hour must be >= 0, "
            f"got {save_seconds}, {restart_seconds}, {failures_per_hour}"
        )
    rate = failures_per_hour / 3600.0
    if math.isinf(checkpoint_interval_s):  # never checkpoint: only sensible without failures
        return 1.0 if rate == 0 else 0.0
    saving = checkpoint_interval_s / (checkpoint_interval_s + save_seconds)
    lost = rate * (restart_seconds + checkpoint_interval_s / 2.0)
    return max(0.0, saving * (1.0 - lost))


# --------------------------------------------------------------------------------------------------------------
# Prices
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class InstanceType:
    """One rentable machine type (see prices.yaml for the meaning and units of each field)."""

    name: str
    on_demand_usd_per_hour: float
    spot_discount: float  # fraction of the on-demand price saved on spot
    gpus: int
    peak_tflops_per_worker: float  # dense bf16 per GPU, or whole-instance fp32 for CPU-only types
    accelerator: str = "none"
    vcpus: int = 0

    @property
    def spot_usd_per_hour(self) -> float:
        return self.on_demand_usd_per_hour * (1.0 - self.spot_discount)

    @property
    def workers_per_instance(self) -> int:
        """Training workers one instance hosts: one per GPU, or one for a CPU-only instance."""
        return max(self.gpus, 1)


_REQUIRED = ("on_demand_usd_per_hour", "spot_discount", "gpus", "peak_tflops_per_worker")


def load_prices(path: str | Path | None = None) -> dict[str, InstanceType]:
    """Read instance types from a prices YAML (default: app/prices.yaml next to this module)."""
    path = Path(path) if path is not None else DEFAULT_PRICES
    if not path.is_file():
        raise ValueError(f"price file {path} not found; pass an existing YAML (copy app/prices.yaml to start)")
    doc = yaml.safe_load(path.read_text()) or {}
    entries = doc.get("instances") if isinstance(doc, dict) else None
    if not isinstance(entries, dict) or not entries:
        raise ValueError(f"{path}: expected a top-level 'instances:' mapping of instance type → prices")
    out = {}
    for name, spec in entries.items():
        spec = spec or {}
        missing = [k for k in _REQUIRED if k not in spec]
        if missing:
            raise ValueError(f"{path}: instance {name!r} lacks {', '.join(missing)}; add them (see app/prices.yaml)")
        unknown = set(spec) - set(_REQUIRED) - {"accelerator", "vcpus"}
        if unknown:
            raise ValueError(f"{path}: instance {name!r} has unknown field(s) {sorted(unknown)}; check the spelling")
        inst = InstanceType(
            name=str(name),
            on_demand_usd_per_hour=float(spec["on_demand_usd_per_hour"]),
            spot_discount=float(spec["spot_discount"]),
            gpus=int(spec["gpus"]),
            peak_tflops_per_worker=float(spec["peak_tflops_per_worker"]),
            accelerator=str(spec.get("accelerator", "none")),
            vcpus=int(spec.get("vcpus", 0)),
        )
        if inst.on_demand_usd_per_hour <= 0 or inst.peak_tflops_per_worker <= 0 or inst.gpus < 0:
            raise ValueError(f"{path}: instance {name!r} needs price > 0, peak_tflops_per_worker > 0 and gpus >= 0")
        if not 0.0 <= inst.spot_discount < 1.0:
            raise ValueError(f"{path}: instance {name!r} spot_discount={inst.spot_discount} must be in [0, 1)")
        out[inst.name] = inst
    return out


# --------------------------------------------------------------------------------------------------------------
# The planner
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PurchaseEstimate:
    """Time and money for one way of buying the machines (on-demand or spot)."""

    purchase: str  # "on_demand" or "spot"
    usd_per_instance_hour: float
    failures_per_hour: float  # for the whole job: per-instance rate × instances
    checkpoint_interval_s: float  # seconds of work between checkpoints
    goodput: float  # productive / wall time
    wall_hours: float
    cost_usd: float  # wall_hours × instances × usd_per_instance_hour


@dataclass(frozen=True)
class TrainingPlan:
    """A compute-optimal run for a compute (or USD) budget, with its predicted loss, time and cost."""

    compute_flops: float
    n_params: float  # N_opt
    n_tokens: float  # D_opt
    loss: float  # predicted final loss (nats/token)
    loss_lo: float  # bootstrap interval of the prediction; NaN when the fit has no bootstrap
    loss_hi: float
    instance: str
    workers: int
    instances: int
    tokens_per_second_per_worker: float
    throughput_source: str  # how tokens/s was obtained (measured, rescaled, or estimated from peak × MFU)
    purchase: str  # the option the budget refers to: "spot" or "on_demand"
    on_demand: PurchaseEstimate
    spot: PurchaseEstimate
    warnings: tuple[str, ...] = ()  # the fit's own (ScalingFit.warnings), and a long extrapolation

    @property
    def chosen(self) -> PurchaseEstimate:
        return self.spot if self.purchase == "spot" else self.on_demand

    @property
    def wall_hours(self) -> float:
        return self.chosen.wall_hours

    @property
    def cost_usd(self) -> float:
        return self.chosen.cost_usd

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict; NaN and ±inf become None."""
        out = asdict(self)
        out.update(wall_hours=self.wall_hours, cost_usd=self.cost_usd,
                   checkpoint_interval_s=self.chosen.checkpoint_interval_s, goodput=self.chosen.goodput)
        return finite(out)

    def _repr_html_(self) -> str:
        """A field/value table in notebooks (the two purchase options flattened to on_demand.*, spot.*)."""
        from app.console import html_table

        rows: list[tuple[str, Any]] = []
        for key, value in self.to_dict().items():
            items = value.items() if isinstance(value, dict) else [(None, value)]
            rows += [(f"{key}.{sub}" if sub else key, v) for sub, v in items]
        return html_table(["field", "value"], rows)


def plan_training(
    fit: ScalingFit,
    *,
    instance: str,
    compute_flops: float | None = None,
    budget_usd: float | None = None,
    spot: bool = False,
    workers: int = 1,
    tokens_per_second_per_worker: float | None = None,
    throughput_measured_at_params: float | None = None,
    throughput_by_params: Sequence[tuple[float, float]] | None = None,
    mfu: float = 0.4,
    preemptions_per_hour: float = 0.0,
    on_demand_failures_per_hour: float = 0.0,
    save_seconds: float = 60.0,
    restart_seconds: float = 300.0,
    checkpoint_interval_s: float | None = None,
    max_checkpoint_interval_s: float = 3600.0,
    prices: Mapping[str, InstanceType] | str | Path | None = None,
) -> TrainingPlan:
    """Plan a compute-optimal run from a fitted scaling law and a budget in FLOPs or USD.

    Give exactly one of ``compute_flops`` or ``budget_usd``; a USD budget is spent on the ``spot`` or on-demand
    option and inverted to the compute it buys. N_opt, D_opt come from ``fit.frontier`` and the loss interval from
    ``fit.predict``.

    Throughput: ``tokens_per_second_per_worker`` as measured by a training run or probe. Measured on a different
    model size? Pass that size as ``throughput_measured_at_params`` and it is rescaled by N_measured / N_opt
    (constant FLOP/s). Or ``throughput_by_params``: (N, tokens/s per worker) of several runs on this machine type,
    e.g. a sweep's trials — the FLOP/s they achieved (6N × tokens/s) is interpolated to N_opt with `throughput_at`,
    as small models keep less of the hardware's FLOP/s. Without a measurement it is estimated as peak × ``mfu`` /
    (6 N_opt).

    Failures: ``preemptions_per_hour`` is the spot interruption rate of one instance, ``on_demand_failures_per_hour``
    the fault rate of one on-demand instance; the job's rate is that × instances. The checkpoint interval is
    ``checkpoint_interval_s`` or else Young–Daly, capped at ``max_checkpoint_interval_s`` (a run still checkpoints
    when nothing fails, to be resumable). Wall hours = D_opt / (tokens/s × workers) / goodput; cost = wall hours ×
    instances × price, where instances = ceil(workers / GPUs per instance).
    """
    if (compute_flops is None) == (budget_usd is None):
        raise ValueError("give exactly one of compute_flops (FLOPs) or budget_usd (USD) to plan a run")
    table = prices if isinstance(prices, Mapping) else load_prices(prices)
    if instance not in table:
        raise ValueError(f"unknown instance type {instance!r}; known: {', '.join(sorted(table))} (edit prices.yaml)")
    inst = table[instance]
    for name, value in (("workers", workers), ("save_seconds", save_seconds), ("mfu", mfu),
                        ("max_checkpoint_interval_s", max_checkpoint_interval_s)):
        if not value > 0:
            raise ValueError(f"{name} must be > 0, got {value}")
    if preemptions_per_hour < 0 or on_demand_failures_per_hour < 0 or restart_seconds < 0:
        raise ValueError("preemptions_per_hour, on_demand_failures_per_hour and restart_seconds must be >= 0")
    if tokens_per_second_per_worker is not None and not tokens_per_second_per_worker > 0:
        raise ValueError(f"tokens_per_second_per_worker must be > 0, got {tokens_per_second_per_worker}")
    if tokens_per_second_per_worker is not None and throughput_by_params is not None:
        raise ValueError("give tokens_per_second_per_worker (one run) or throughput_by_params (several), not both")
    by_flops = None
    if throughput_by_params is not None:
        by_flops = [(FLOPS_PER_PARAM_TOKEN * n, t) for n, t in throughput_by_params]
        throughput_at(1.0, by_flops)  # validates: at least one pair, all > 0
        measured_n = sorted(n for n, _ in throughput_by_params)
    n_instances = math.ceil(workers / inst.workers_per_instance)
    fit_warnings = fit.warnings  # the same for every compute the USD inversion below tries

    def purchase_estimate(kind: str, n_tokens: float, tokens_per_s: float) -> PurchaseEstimate:
        per_instance = preemptions_per_hour if kind == "spot" else on_demand_failures_per_hour
        price = inst.spot_usd_per_hour if kind == "spot" else inst.on_demand_usd_per_hour
        job_rate = per_instance * n_instances
        interval = checkpoint_interval_s
        if interval is None:
            mtbf = 3600.0 / job_rate if job_rate > 0 else math.inf
            interval = min(young_daly_interval(save_seconds, mtbf), max_checkpoint_interval_s)
        goodput = expected_goodput(interval, save_seconds, restart_seconds, job_rate)
        if goodput <= 0:
            raise ValueError(
                f"{kind}: {job_rate:g} failures/hour for the job leave no productive time (goodput 0); "
                "lower preemptions_per_hour, use fewer instances, or shorten save/restart times"
            )
        wall_hours = n_tokens / (tokens_per_s * workers) / goodput / 3600.0
        return PurchaseEstimate(kind, price, job_rate, interval, goodput, wall_hours, wall_hours * n_instances * price)

    def plan_for(compute: float) -> TrainingPlan:
        n_opt, d_opt, _ = fit.frontier(compute)
        loss, lo, hi = fit.predict(n_opt, d_opt)
        notes = list(fit_warnings)
        factor = fit.extrapolation(compute)
        if factor > LONG_EXTRAPOLATION:
            notes.append(f"C = {compute:.3g} FLOPs is {factor:,.0f}x the largest fitted run's compute: a long "
                         "extrapolation; treat N_opt, D_opt and the predicted loss as rough")
        if by_flops is not None:
            tps = throughput_at(FLOPS_PER_PARAM_TOKEN * n_opt, by_flops)
            source = (f"interpolated at N_opt from the FLOP/s of {len(by_flops)} measured runs "
                      f"(N {measured_n[0]:.3g} to {measured_n[-1]:.3g})")
            if not measured_n[0] <= n_opt <= measured_n[-1]:
                nearest = measured_n[0] if n_opt < measured_n[0] else measured_n[-1]
                notes.append(f"N_opt = {n_opt:.3g} is outside the measured runs' sizes ({measured_n[0]:.3g} to "
                             f"{measured_n[-1]:.3g}): the FLOP/s of N = {nearest:.3g} is held, so wall hours are rough")
        elif tokens_per_second_per_worker is None:
            tps = inst.peak_tflops_per_worker * 1e12 * mfu / (FLOPS_PER_PARAM_TOKEN * n_opt)
            source = f"estimated: {inst.peak_tflops_per_worker:g} TFLOP/s peak × MFU {mfu:g} / (6 N)"
        elif throughput_measured_at_params is not None:
            tps = tokens_per_second_per_worker * throughput_measured_at_params / n_opt
            source = f"measured at N={throughput_measured_at_params:.3g}, rescaled to N_opt"
        else:
            tps, source = tokens_per_second_per_worker, "measured"
        return TrainingPlan(
            compute_flops=float(compute), n_params=float(n_opt), n_tokens=float(d_opt),
            loss=float(loss), loss_lo=float(lo), loss_hi=float(hi),
            instance=instance, workers=workers, instances=n_instances,
            tokens_per_second_per_worker=float(tps), throughput_source=source,
            purchase="spot" if spot else "on_demand",
            on_demand=purchase_estimate("on_demand", d_opt, tps), spot=purchase_estimate("spot", d_opt, tps),
            warnings=tuple(notes),
        )

    if compute_flops is not None:
        if not compute_flops > 0:
            raise ValueError(f"compute_flops must be > 0, got {compute_flops}")
        return plan_for(float(compute_flops))

    if not budget_usd > 0:
        raise ValueError(f"budget_usd must be > 0, got {budget_usd}")
    # Cost grows monotonically with compute (more tokens, bigger model), so a bracketed root find inverts it.
    def excess(log10_c: float) -> float:
        return math.log(plan_for(10.0**log10_c).cost_usd / budget_usd)

    lo, hi = 6.0, 36.0
    if excess(lo) > 0:
        raise ValueError(f"budget_usd={budget_usd:g} buys less than 1e6 FLOPs on {instance}; raise the budget")
    if excess(hi) < 0:
        raise ValueError(f"budget_usd={budget_usd:g} buys more than 1e36 FLOPs; check the budget and throughput")
    return plan_for(10.0 ** brentq(excess, lo, hi, xtol=1e-12, rtol=1e-14))
