"""The Grafana dashboard: valid JSON in Grafana's dashboard shape, and every query names a metric
deployments/metrics.py defines (in the form Ray's endpoint exports it), and every metric is shown.

tests/e2e/test_metrics.py checks the same names against what a running cluster actually exports.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from vlora.deployments.metrics import define_all, exported_names

DASHBOARD = Path(__file__).resolve().parents[2] / "deployments" / "grafana_dashboard.json"


def dashboard_metric_names(dash: dict) -> set[str]:
    """Metric names (Ray's exported form, `ray_...`) in the panels' PromQL expressions."""
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    return {n for e in exprs for n in re.findall(r"\b(ray_[a-z0-9_]+)", e)}


@pytest.fixture(scope="module")
def dash() -> dict:
    return json.loads(DASHBOARD.read_text())


def test_dashboard_has_grafana_shape_and_a_prometheus_datasource_variable(dash):
    assert isinstance(dash["schemaVersion"], int) and dash["schemaVersion"] >= 30
    assert dash["uid"] and dash["title"]
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    ds = variables["datasource"]
    assert (ds["type"], ds["query"]) == ("datasource", "prometheus")
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for p in dash["panels"]:
        g = p["gridPos"]
        assert g["w"] >= 1 and g["h"] >= 1 and g["x"] >= 0 and g["x"] + g["w"] <= 24 and g["y"] >= 0, p["title"]
        if p["type"] == "row":
            continue
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
        assert p["targets"], p["title"]
        refs = [t["refId"] for t in p["targets"]]
        assert len(refs) == len(set(refs)), p["title"]
        for t in p["targets"]:
            assert t["datasource"]["uid"] == "${datasource}"
            assert t["expr"].count("(") == t["expr"].count(")"), t["expr"]
            assert t["expr"].count("{") == t["expr"].count("}"), t["expr"]
            for var in re.findall(r"\$(\w+)", t["expr"]):
                assert var in variables or var.startswith("__"), f"{p['title']}: unknown variable ${var}"


def test_panels_do_not_overlap(dash):
    cells: dict[tuple[int, int], str] = {}
    for p in dash["panels"]:
        g = p["gridPos"]
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"{p['title']} overlaps {cells[(x, y)]}"
                cells[(x, y)] = p["title"]


def test_every_query_names_a_defined_metric_and_every_metric_has_a_panel(dash):
    defined = define_all()
    exported = {n for name, kind in defined.items() for n in exported_names(name, kind)}
    used = dashboard_metric_names(dash)
    assert not used - exported, f"queries name metrics that deployments/metrics.py does not define: {used - exported}"
    shown = {name for name, kind in defined.items() if set(exported_names(name, kind)) & used}
    assert shown == set(defined), f"metrics without a panel: {sorted(set(defined) - shown)}"


def test_histogram_panels_use_buckets_not_sums(dash):
    """Ray rebuilds histograms from bucket counts, so _sum is approximate: quantiles come from _bucket."""
    for p in dash["panels"]:
        for t in p.get("targets", []):
            assert "_sum" not in t["expr"] and "_count" not in t["expr"], t["expr"]
            if "_bucket" in t["expr"]:
                assert "histogram_quantile(" in t["expr"] and "by (le" in t["expr"], t["expr"]
