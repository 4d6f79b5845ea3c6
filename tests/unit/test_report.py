"""embedpipe.index.report: one self-contained HTML page with the three plots."""

from __future__ import annotations

import re

from embedpipe.index.report import render

METRICS = {"recall@1": 0.4, "recall@5": 0.7, "recall@10": 0.8, "recall@100": 0.95, "mrr@10": 0.5, "ndcg@10": 0.6}


def data(**over) -> dict:
    base = {
        "run_id": "r1",
        "dataset": "demo",
        "kind": "full",
        "promoted": True,
        "gate": {"reason": "recall@10 0.8 vs 0.7"},
        "metrics": METRICS,
        "previous_metrics": {k: v - 0.1 for k, v in METRICS.items()},
        "metrics_by_mode": {"dense": METRICS, "hybrid": METRICS},
        "previous_metrics_by_mode": {"dense": METRICS},
        "stage_seconds": {"training": 12.5, "embedding": 3.0, "index": 1.25},
        "counts": {"upserted": 10, "deleted": 0, "unchanged": 0, "total": 10},
    }
    return {**base, **over}


def svg(page: str, plot_id: str) -> str:
    m = re.search(rf'<svg id="{plot_id}".*?</svg>', page, re.S)
    assert m, f"plot {plot_id} missing"
    return m.group(0)


def test_report_has_loss_recall_and_timing_plots():
    curve = [{"step": s, "loss": 2.0 / (s + 1)} for s in range(10)]
    page = render(data(), curve)
    assert (
        page.startswith("<!doctype html>")
        and "<script" not in page
        and "http://" not in page.replace('xmlns="http://www.w3.org/2000/svg"', "")
    ), "self-contained: no scripts, no external resources"
    loss = svg(page, "plot-loss")
    points = re.search(r'<polyline[^>]*points="([^"]+)"', loss).group(1).split()
    assert len(points) == 10
    ys = [float(p.split(",")[1]) for p in points]
    assert ys == sorted(ys), "a falling loss is drawn going down (SVG y grows downwards)"
    recall = svg(page, "plot-recall")
    assert recall.count("<rect") >= 8  # 4 recall@k groups x (new, previous), plus legend swatches
    assert "new recall@10: 0.8" in recall and "previous recall@10: 0.7" in recall
    stages = svg(page, "plot-stages")
    assert "seconds training: 12.5" in stages and "seconds index: 1.25" in stages


def test_report_without_a_loss_curve_or_previous_index_still_renders():
    page = render(data(kind="incremental", previous_metrics=None, previous_metrics_by_mode=None), None)
    assert "no training loss recorded" in svg(page, "plot-loss")
    assert "previous recall@10" not in svg(page, "plot-recall")
