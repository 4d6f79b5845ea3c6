"""``report.html`` for a run: one self-contained page (no scripts, no external files) with inline SVG plots.

Plots: the training loss curve (``metrics.json`` ``loss_curve`` of the trainer), recall@k of the new index vs the one
it replaces (same qrels, same run), and the stage timings. A table holds every metric by search mode. The indexer
writes it to ``<run>/report.html`` and puts its URI in the index-updated event.
"""

from __future__ import annotations

import html
import json

W, H, PAD = 560, 220, 40
NEW_COLOR, OLD_COLOR, LINE_COLOR = "#2563eb", "#9ca3af", "#dc2626"


def _points(curve) -> list[tuple[float, float]]:
    """``loss_curve`` entries as (step, loss): dicts with step/loss, pairs, or bare numbers."""
    out = []
    for i, p in enumerate(curve or []):
        if isinstance(p, dict) and "loss" in p:
            out.append((float(p.get("step", i)), float(p["loss"])))
        elif isinstance(p, (list, tuple)) and len(p) == 2:
            out.append((float(p[0]), float(p[1])))
        elif isinstance(p, (int, float)):
            out.append((float(i), float(p)))
    return out


def _empty(plot_id: str, note: str) -> str:
    return (
        f'<svg id="{plot_id}" class="plot" width="{W}" height="{H // 3}" xmlns="http://www.w3.org/2000/svg">'
        f'<text x="10" y="30" fill="#6b7280">{html.escape(note)}</text></svg>'
    )


def line_plot(points: list[tuple[float, float]], plot_id: str, y_label: str) -> str:
    if len(points) < 1:
        return _empty(plot_id, "no training loss recorded (incremental run, or the trainer wrote no curve)")
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    x0, x1 = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1
    y0, y1 = min(ys), max(ys) if max(ys) > min(ys) else min(ys) + 1

    def sx(x):
        return PAD + (x - x0) / (x1 - x0) * (W - 2 * PAD)

    def sy(y):
        return H - PAD - (y - y0) / (y1 - y0) * (H - 2 * PAD)

    path = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in points)
    return (
        f'<svg id="{plot_id}" class="plot" width="{W}" height="{H}" xmlns="http://www.w3.org/2000/svg">'
        f'<line x1="{PAD}" y1="{H - PAD}" x2="{W - PAD}" y2="{H - PAD}" stroke="#111"/>'
        f'<line x1="{PAD}" y1="{PAD}" x2="{PAD}" y2="{H - PAD}" stroke="#111"/>'
        f'<polyline fill="none" stroke="{LINE_COLOR}" stroke-width="2" points="{path}"/>'
        f'<text x="{PAD}" y="{PAD - 8}" font-size="11">{html.escape(y_label)} {y1:.4g} (top) .. {y0:.4g}</text>'
        f'<text x="{W - PAD}" y="{H - 10}" font-size="11" text-anchor="end">step {x0:g} .. {x1:g}</text>'
        "</svg>"
    )


def bar_plot(groups: list[str], series: dict[str, list[float | None]], plot_id: str, y_max: float | None = None) -> str:
    """Grouped bars: one group per label, one bar per series (None = missing)."""
    values = [v for vs in series.values() for v in vs if v is not None]
    if not groups or not values:
        return _empty(plot_id, "nothing to plot")
    top = y_max or max(values) or 1.0
    colors = [NEW_COLOR, OLD_COLOR, "#16a34a", "#f59e0b"]
    group_w = (W - 2 * PAD) / len(groups)
    bar_w = group_w * 0.8 / max(1, len(series))
    parts = [f'<svg id="{plot_id}" class="plot" width="{W}" height="{H}" xmlns="http://www.w3.org/2000/svg">']
    parts.append(f'<line x1="{PAD}" y1="{H - PAD}" x2="{W - PAD}" y2="{H - PAD}" stroke="#111"/>')
    for gi, label in enumerate(groups):
        gx = PAD + gi * group_w + group_w * 0.1
        for si, (name, vals) in enumerate(series.items()):
            v = vals[gi]
            if v is None:
                continue
            h = (H - 2 * PAD) * v / top
            x, y = gx + si * bar_w, H - PAD - h
            parts.append(
                f'<rect x="{x:.1f}" y="{y:.1f}" width="{bar_w - 2:.1f}" height="{h:.1f}" '
                f'fill="{colors[si % len(colors)]}"><title>{html.escape(name)} {html.escape(label)}: {v:.4g}'
                "</title></rect>"
            )
            parts.append(
                f'<text x="{x + bar_w / 2:.1f}" y="{y - 3:.1f}" font-size="9" text-anchor="middle">{v:.3g}</text>'
            )
        parts.append(
            f'<text x="{gx + group_w * 0.4:.1f}" y="{H - PAD + 14}" font-size="11" text-anchor="middle">'
            f"{html.escape(label)}</text>"
        )
    for si, name in enumerate(series):
        parts.append(
            f'<rect x="{W - PAD - 110}" y="{8 + si * 14}" width="10" height="10" fill="{colors[si % len(colors)]}"/>'
            f'<text x="{W - PAD - 96}" y="{17 + si * 14}" font-size="11">{html.escape(name)}</text>'
        )
    parts.append("</svg>")
    return "".join(parts)


def _metrics_table(by_mode: dict, previous_by_mode: dict | None) -> str:
    rows = ["<tr><th>index</th><th>mode</th>" + "".join(f"<th>{k}</th>" for k in _keys(by_mode)) + "</tr>"]
    for label, table in (("new", by_mode), ("previous", previous_by_mode or {})):
        for mode, m in table.items():
            cells = "".join(f"<td>{m.get(k, float('nan')):.4f}</td>" for k in _keys(by_mode))
            rows.append(f"<tr><td>{label}</td><td>{html.escape(mode)}</td>{cells}</tr>")
    return "<table>" + "".join(rows) + "</table>"


def _keys(by_mode: dict) -> list[str]:
    for m in by_mode.values():
        return list(m)
    return []


def render(event_data: dict, loss_curve=None) -> str:
    """The report page for one run, from its index-updated payload and the trainer's loss curve."""
    d = event_data
    new, old = d.get("metrics") or {}, d.get("previous_metrics") or {}
    recall_keys = [k for k in new if k.startswith("recall@")] or ["recall@1", "recall@5", "recall@10", "recall@100"]
    recall = bar_plot(
        recall_keys,
        {"new": [new.get(k) for k in recall_keys], "previous": [old.get(k) for k in recall_keys]},
        "plot-recall",
        y_max=1.0,
    )
    by_mode = d.get("metrics_by_mode") or {}
    modes = [m for m in ("bm25", "base", "bm25+base", "dense", "hybrid", "served") if by_mode.get(m)]
    headline = ["recall@10", "ndcg@10", "mrr@10"]
    baselines = bar_plot(headline, {m: [by_mode[m].get(k) for k in headline] for m in modes}, "plot-modes", y_max=1.0)
    stages = d.get("stage_seconds") or {}
    timings = bar_plot(list(stages), {"seconds": [float(v) for v in stages.values()]}, "plot-stages")
    loss = line_plot(_points(loss_curve), "plot-loss", "loss")
    gate = d.get("gate") or {}
    title = f"embedpipe run {d.get('run_id')} ({d.get('dataset')})"
    summary = {
        "kind": d.get("kind"),
        "promoted": d.get("promoted"),
        "gate": gate.get("reason"),
        **({"served instead (first-run fallback)": d["fallback"]["served"]} if d.get("fallback") else {}),
        "collection": d.get("collection"),
        "previous collection": d.get("previous_collection"),
        "default search mode": d.get("default_search_mode"),
        "search settings": d.get("search"),
        "model tuned": (d.get("model") or {}).get("tuned"),
        "why this model": (d.get("model") or {}).get("shipped_reason"),
        "selection split": {
            k: v for k, v in (d.get("selection") or {}).items() if k in ("split", "queries", "base", "tuned")
        },
        "selection vs test (modes, after the fact)": d.get("selection_agreement"),
        "counts": d.get("counts"),
        "model": (d.get("model") or {}).get("uri"),
        "fingerprint": (d.get("model") or {}).get("fingerprint"),
        "trigger": d.get("trigger"),
    }
    items = "".join(
        f"<tr><th>{html.escape(k)}</th><td>{html.escape(v if isinstance(v, str) else json.dumps(v))}</td></tr>"
        for k, v in summary.items()
    )
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:system-ui,sans-serif;margin:2em;max-width:960px}}
table{{border-collapse:collapse;margin:1em 0}}
th,td{{border:1px solid #ddd;padding:4px 8px;text-align:left;font-size:13px}}
.plot{{display:block;margin:0.5em 0}}</style>
</head><body>
<h1>{html.escape(title)}</h1>
<table>{items}</table>
<h2>Training loss</h2>{loss}
<h2>Base model vs fine-tune vs BM25 (eval split)</h2>{baselines}
<h2>Recall@k: new vs previous index</h2>{recall}
<h2>Metrics by search mode</h2>{_metrics_table(d.get("metrics_by_mode") or {}, d.get("previous_metrics_by_mode"))}
<h2>Stage timings (s)</h2>{timings}
</body></html>
"""
