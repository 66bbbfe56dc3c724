"""dashboards/scalestack.json stays in step with the code: every series its PromQL reads is one the code exports
(under the name Ray's Prometheus endpoint gives it), every label it filters or groups by is one of that metric's
tags, and every exported metric has a panel. No Ray is started: the code's metric objects are built against
recording stand-ins for ray.util.metrics."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

DASHBOARD = Path(__file__).resolve().parents[2] / "dashboards" / "scalestack.json"
# Labels Ray's metrics agent adds to every application series, and Prometheus' histogram bucket label.
RAY_LABELS = {"Component", "NodeAddress", "SessionName", "Version", "WorkerId", "le", "otel_scope_name",
              "otel_scope_schema_url", "otel_scope_version"}
# How Ray's endpoint (OpenTelemetry's Prometheus exporter) names the series of each metric kind.
SUFFIXES = {"Gauge": ("",), "Counter": ("_total",), "Histogram": ("_bucket", "_sum", "_count")}


class _Recorded:
    defined: dict[str, tuple[str, tuple[str, ...]]] = {}

    def __init__(self, name, description="", boundaries=None, tag_keys=None):
        assert name not in self.defined or self.defined[name][0] == type(self).__name__, name
        self.defined[name] = (type(self).__name__, tuple(tag_keys or ()))

    def set(self, *a, **k): ...
    def inc(self, *a, **k): ...
    def observe(self, *a, **k): ...


@pytest.fixture(scope="module")
def defined() -> dict[str, tuple[str, tuple[str, ...]]]:
    """{metric name as the code registers it: (kind, tag keys)} from the real RayTrainMetrics and RouterMetrics."""
    import ray.util.metrics

    from app.metrics import RayTrainMetrics
    from serve_deployments.metrics import RouterMetrics

    kinds = {k: type(k, (_Recorded,), {}) for k in SUFFIXES}
    with pytest.MonkeyPatch.context() as mp:
        for kind, cls in kinds.items():
            mp.setattr(ray.util.metrics, kind, cls)
        _Recorded.defined = {}
        RayTrainMetrics("run")
        RouterMetrics(export=True)
    return dict(_Recorded.defined)


@pytest.fixture(scope="module")
def series(defined) -> dict[str, str]:
    """{series name on Ray's endpoint: metric name in the code}."""
    return {f"ray_{name}{suffix}": name for name, (kind, _) in defined.items() for suffix in SUFFIXES[kind]}


@pytest.fixture(scope="module")
def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def _targets(dashboard):
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            yield panel, target


def test_the_code_defines_what_the_readme_names(defined):
    assert {n for n in defined if n.startswith("scalestack_train_")} == {
        f"scalestack_train_{n}" for n in
        ("loss", "val_loss", "tokens_per_s", "mfu", "step_time_s", "straggler_ratio", "goodput", "step")}
    assert defined["scalestack_router_requests"] == ("Counter", ("route", "model", "cache"))
    assert defined["scalestack_router_latency_s"] == ("Histogram", ("model",))
    assert defined["scalestack_train_loss"] == ("Gauge", ("run",))
    assert len(defined) == 15


def test_every_series_in_the_promql_is_exported_with_its_labels(dashboard, series, defined):
    exprs = [t["expr"] for _, t in _targets(dashboard)]
    exprs += [v["query"]["query"] for v in dashboard["templating"]["list"] if v["type"] == "query"]
    assert len(exprs) > 20
    for expr in exprs:
        used = re.findall(r"\bray_\w+", expr)
        assert used, f"no Ray series in {expr!r}"
        for name in used:
            assert name in series, f"{name} (in {expr!r}) is not a series the code exports; known: {sorted(series)}"
        # labels matched in selectors, grouped by, or read by label_values / label_replace
        allowed = RAY_LABELS.union(*(defined[series[n]][1] for n in used))
        labels = re.findall(r"(\w+)\s*(?:=~|!~|!=|=)\s*\"", expr)
        labels += [lab.strip() for group in re.findall(r"\bby\s*\(([^)]*)\)", expr) for lab in group.split(",")]
        labels += re.findall(r"label_values\(\w+,\s*(\w+)\)", expr)
        labels += re.findall(r'label_replace\(.*,\s*"(\w+)",\s*"[^"]*",\s*"(?:\w+)"', expr)
        for label in labels:
            assert label in allowed, f"label {label!r} in {expr!r} is not a tag of {used}"


def test_every_exported_metric_has_a_panel(dashboard, series, defined):
    on_panels = {series[n] for _, t in _targets(dashboard) for n in re.findall(r"\bray_\w+", t["expr"])}
    assert on_panels == set(defined)


def test_datasource_is_a_variable_and_the_layout_is_sound(dashboard):
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    ids, cells = set(), set()
    for panel in dashboard["panels"]:
        assert panel["id"] not in ids
        ids.add(panel["id"])
        g = panel["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24, panel["title"]
        mine = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
        assert not mine & cells, f"panel {panel['title']!r} overlaps another"
        cells |= mine
        if panel["type"] != "row":
            assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
            assert panel["targets"] and all(t["datasource"]["uid"] == "${datasource}" for t in panel["targets"])
            assert len({t["refId"] for t in panel["targets"]}) == len(panel["targets"])
            assert panel.get("description"), panel["title"]
