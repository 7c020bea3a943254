"""The dashboard's charts: plotly figures of what :mod:`flows.dashboard.data` reads."""

from __future__ import annotations

import colorsys
from typing import Any

import plotly.express as px
import plotly.graph_objects as go

from flows.dashboard.data import OK, CaptionSummary, DatasetCount, Histogram
from infu.records import RejectReason

TEMPLATE = "plotly_white"
HEIGHT = 320
CURVE_POINTS = 2000
"""Points per training curve: a long run's curves stay light in the page."""
KEPT_COLOR = "#2ca02c"


def _distinct_from_kept(color: str) -> bool:
    """Neither green (kept samples' colour) nor too pale to see on white."""
    hue, lightness, _ = colorsys.rgb_to_hls(*(int(color[index : index + 2], 16) / 255 for index in (1, 3, 5)))
    return not 70 / 360 <= hue <= 170 / 360 and lightness < 0.8


_PALETTE = [
    color
    for color in (*px.colors.qualitative.Dark24, *px.colors.qualitative.Light24)
    if _distinct_from_kept(color)
]
OUTCOME_COLORS = {
    OK: KEPT_COLOR,
    **{reason.value: _PALETTE[index % len(_PALETTE)] for index, reason in enumerate(RejectReason)},
}
"""One colour per outcome in every chart: kept is green, each reject reason has its own."""
OTHER_COLOR = "#7f7f7f"


def outcome_color(outcome: str) -> str:
    return OUTCOME_COLORS.get(outcome, OTHER_COLOR)


def _styled(figure: go.Figure, title: str, height: int = HEIGHT, legend_on_top: bool = False) -> go.Figure:
    """Common look; ``legend_on_top``: a horizontal legend under the title (narrow charts)."""
    legend: dict[str, Any] = {"title": {"text": ""}}
    if legend_on_top:
        legend.update(orientation="h", x=0, xanchor="left", y=1.02, yanchor="bottom", font={"size": 10})
    figure.update_layout(
        title={"text": title, "x": 0.01, "y": 0.97, "yanchor": "top", "font": {"size": 15}},
        template=TEMPLATE,
        height=height,
        margin={"l": 60, "r": 20, "t": 100 if legend_on_top else 50, "b": 50},
        legend=legend,
    )
    return figure


def funnel_figure(funnel: dict[str, dict[str, int]]) -> go.Figure:
    """Rows per step, stacked by outcome (kept, or the reject reason)."""
    rows = [
        {"step": step, "outcome": outcome, "rows": count}
        for step, counts in funnel.items()
        for outcome, count in counts.items()
    ]
    figure = px.bar(
        rows,
        x="step",
        y="rows",
        color="outcome",
        color_discrete_map={row["outcome"]: outcome_color(row["outcome"]) for row in rows},
        category_orders={"step": list(funnel)},
        labels={"step": "Step", "rows": "Rows", "outcome": "Outcome"},
    )
    return _styled(figure, "Rejection funnel: rows per step by outcome", height=420)


def dataset_funnel_figure(counts: list[DatasetCount]) -> go.Figure:
    """Rows per source (dataset, or model for benchmark images), stacked by outcome, one panel per step."""
    steps = list(dict.fromkeys(count.step for count in counts))
    rows = [
        {"step": count.step, "source": count.dataset, "outcome": count.outcome, "rows": count.count}
        for count in counts
    ]
    figure = px.bar(
        rows,
        x="source",
        y="rows",
        color="outcome",
        facet_col="step",
        facet_col_wrap=4,
        facet_row_spacing=0.12,
        category_orders={"step": steps},
        color_discrete_map={row["outcome"]: outcome_color(row["outcome"]) for row in rows},
        labels={"source": "Source", "rows": "Rows", "outcome": "Outcome"},
    )
    figure.for_each_annotation(lambda annotation: annotation.update(text=annotation.text.split("=")[-1]))
    figure.update_xaxes(matches=None, showticklabels=True)
    figure.update_yaxes(matches=None, showticklabels=True)
    panel_rows = max(1, -(-len(steps) // 4))
    return _styled(figure, "Rejection funnel per source dataset", height=80 + 260 * panel_rows)


def histogram_figure(histogram: Histogram) -> go.Figure:
    """A metric's binned counts, stacked by outcome."""
    width = histogram.edges[1] - histogram.edges[0]
    centers = [low + width / 2 for low in histogram.edges[:-1]]
    figure = go.Figure(
        [
            go.Bar(
                x=centers,
                y=counts,
                width=width,
                name=outcome,
                marker={"color": outcome_color(outcome), "line": {"width": 0}},
                hovertemplate=f"{outcome}: %{{y}} rows<br>%{{x:.3g}} ± {width / 2:.3g}<extra></extra>",
            )
            for outcome, counts in histogram.counts.items()
        ]
    )
    figure.update_layout(barmode="stack", bargap=0)
    figure.update_xaxes(title_text=histogram.metric.label)
    figure.update_yaxes(title_text="Rows")
    title = f"{histogram.step}: {histogram.metric.title} ({histogram.total} rows)"
    return _styled(figure, title, height=HEIGHT + 40, legend_on_top=True)


def caption_sources_figure(summary: CaptionSummary) -> go.Figure:
    """Per caption source: captions stored, dropped by the checks, and missing."""
    rows = [
        {"source": source, "captions": counts[kind], "kind": kind}
        for source, counts in summary.sources.items()
        for kind in ("stored", "dropped", "missing")
    ]
    figure = px.bar(
        rows,
        x="source",
        y="captions",
        color="kind",
        color_discrete_map={"stored": KEPT_COLOR, "dropped": "#d62728", "missing": "#bbbbbb"},
        labels={"source": "Caption source", "captions": "Samples", "kind": ""},
    )
    return _styled(figure, "Caption sources: stored, dropped by the checks, missing")


def caption_lengths_figure(summary: CaptionSummary) -> go.Figure:
    """Stored captions per word count, by source."""
    figure = px.bar(
        summary.lengths,
        x="words",
        y="captions",
        color="source",
        barmode="group",
        labels={"words": "Words", "captions": "Captions", "source": "Source"},
    )
    return _styled(figure, "Caption lengths (words) per source")


def caption_flags_figure(summary: CaptionSummary) -> go.Figure:
    """Flags the caption checks raised, per source."""
    figure = px.bar(
        summary.flags,
        x="flag",
        y="count",
        color="source",
        barmode="group",
        labels={"flag": "Flag", "count": "Captions", "source": "Source"},
    )
    return _styled(figure, "Caption flags per source")


def buckets_figure(buckets: list[dict[str, Any]]) -> go.Figure:
    """Kept samples per aspect-ratio bucket, by step."""
    rows = [{**row, "bucket": f"{row['width']}x{row['height']}"} for row in buckets]
    figure = px.bar(
        rows,
        x="bucket",
        y="samples",
        color="step",
        barmode="group",
        labels={
            "bucket": "Bucket (width x height, narrowest first)",
            "samples": "Kept samples",
            "step": "Step",
        },
    )
    figure.update_xaxes(type="category")
    return _styled(figure, "Aspect-ratio buckets of the kept samples")


def training_figure(curves: dict[str, list[dict[str, Any]]], metric: str) -> go.Figure:
    """One training metric against the optimiser step, a line per training step (at most
    :data:`CURVE_POINTS` evenly spaced steps of each, its last one included)."""
    rows = []
    for stage, lines in curves.items():
        stride = -(-len(lines) // CURVE_POINTS)
        shown = [*lines[:-1:stride], lines[-1]] if lines else []
        rows += [
            {"stage": stage, "step": line["step"], metric: line[metric]}
            for line in shown
            if line.get(metric) is not None
        ]
    figure = px.line(rows, x="step", y=metric, color="stage", labels={"step": "Optimiser step", "stage": ""})
    return _styled(figure, f"Training: {metric}")


def eval_means_figure(summary: dict[str, Any]) -> go.Figure:
    """Each model's mean per metric with its 95% bootstrap interval, one panel per metric."""
    rows = [
        {
            "model": model,
            "metric": metric,
            "mean": stats["mean"],
            "above": stats["high"] - stats["mean"],
            "below": stats["mean"] - stats["low"],
        }
        for model, values in summary["models"].items()
        for metric, stats in sorted(values["metrics"].items())
    ]
    metrics = list(dict.fromkeys(row["metric"] for row in rows))
    figure = px.bar(
        rows,
        x="model",
        y="mean",
        color="model",
        error_y="above",
        error_y_minus="below",
        **_metric_panels(metrics),
        labels={"model": "Model", "mean": "Mean"},
    )
    return _styled_panels(figure, metrics, "Evaluation: mean and 95% interval per metric")


def eval_scores_figure(scores: list[dict[str, Any]], metrics: list[str]) -> go.Figure:
    """Per-image scores: a box per model, one panel per metric."""
    rows = [
        {"model": row["model"], "metric": metric, "value": row[metric]}
        for row in scores
        for metric in metrics
        if row.get(metric) is not None
    ]
    figure = px.box(
        rows,
        x="model",
        y="value",
        color="model",
        **_metric_panels(metrics),
        labels={"model": "Model", "value": "Score"},
    )
    return _styled_panels(figure, metrics, "Evaluation: per-image scores")


PANELS_PER_ROW = 3


def _metric_panels(metrics: list[str]) -> dict[str, Any]:
    """plotly express arguments for one panel per metric, :data:`PANELS_PER_ROW` to a row."""
    return {
        "facet_col": "metric",
        "facet_col_wrap": PANELS_PER_ROW,
        "facet_row_spacing": 0.15,
        "category_orders": {"metric": metrics},
    }


def _styled_panels(figure: go.Figure, metrics: list[str], title: str) -> go.Figure:
    """Panels titled by their metric alone, each with its own y axis, tall enough for every row."""
    figure.for_each_annotation(lambda annotation: annotation.update(text=annotation.text.split("=")[-1]))
    figure.update_yaxes(matches=None, showticklabels=True)
    rows = max(1, -(-len(metrics) // PANELS_PER_ROW))
    return _styled(figure, title, height=80 + 240 * rows)
