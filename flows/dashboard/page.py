"""The dashboard page: HTML sections shared by the snapshot and the served dashboard.

Every chart is a plotly figure in a ``div`` with a stable id (``chart-...``); the funnel numbers are in
tables whose rows carry ``data-step``, ``data-dataset``, ``data-outcome`` and ``data-count``, and every
thumbnail tile ``data-step``, ``data-key``, ``data-outcome`` and ``data-dataset``, for tests and tools.
"""

from __future__ import annotations

import base64
import html
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import plotly.graph_objects as go

from flows.dashboard import figures
from flows.dashboard.data import OK, DatasetCount, RunData, Thumbnail

TITLE = "InfU data-quality dashboard"
PLOTLY_CONFIG = {"displaylogo": False, "responsive": True}
TRAINING_METRICS = ("loss", "grad_norm", "lr", "samples_per_s")
EVAL_EXTRAS = ("images", "scored", "no_face", "fid", "lpips_diversity")
"""The eval summary's per-model numbers beside the metrics."""
MISSING = "—"
SECTIONS = (
    ("steps", "Steps"),
    ("funnel", "Funnel"),
    ("histograms", "Histograms"),
    ("captions", "Captions"),
    ("buckets", "Buckets"),
    ("thumbnails", "Thumbnails"),
    ("training", "Training"),
    ("eval", "Evaluation"),
)

STYLE = """
body { font-family: system-ui, sans-serif; margin: 0; color: #222; background: #fafafa; }
header { background: #263238; color: #fff; padding: 0.8em 1.5em; }
header h1 { margin: 0; font-size: 1.4em; }
header p { margin: 0.2em 0 0; color: #cfd8dc; }
nav { background: #eceff1; padding: 0.5em 1.5em; position: sticky; top: 0; z-index: 10; }
nav a { margin-right: 1em; color: #1565c0; text-decoration: none; }
main { padding: 0 1.5em 2em; }
section { margin-top: 1.5em; scroll-margin-top: 3.5em; }
h2 { border-bottom: 2px solid #cfd8dc; padding-bottom: 0.2em; }
.charts { display: grid; grid-template-columns: repeat(auto-fill, minmax(420px, 1fr)); gap: 0.8em; }
.chart { background: #fff; border: 1px solid #e0e0e0; border-radius: 4px; padding: 0.3em; }
.wide { grid-column: 1 / -1; }
table { border-collapse: collapse; margin: 0.8em 0; background: #fff; }
th, td { border: 1px solid #ddd; padding: 0.25em 0.6em; text-align: right; white-space: nowrap; }
thead th, td.text { text-align: left; }
thead th { background: #eceff1; }
tr.missing td { color: #999; }
.note { color: #555; max-width: 70em; }
.warning { background: #fff8e1; border-left: 4px solid #ffb300; padding: 0.5em 1em; max-width: 70em; }
.tables { display: flex; flex-wrap: wrap; gap: 2em; align-items: flex-start; }
.grid { display: flex; flex-wrap: wrap; gap: 0.6em; }
.outcomes { display: flex; flex-wrap: wrap; gap: 0.5em 2.5em; align-items: flex-start; }
.outcomes h4 { margin: 0.6em 0 0.4em; }
figure.thumb { margin: 0; width: 170px; background: #fff; border: 2px solid #ddd; border-radius: 4px;
  padding: 4px; font-size: 0.75em; }
figure.thumb.ok { border-color: #2ca02c; }
figure.thumb.rejected { border-color: #d62728; }
figure.thumb img, figure.thumb .no-image { display: block; width: 160px; height: 160px; object-fit: contain;
  background: #f4f4f4; }
figure.thumb .no-image { display: flex; align-items: center; justify-content: center; color: #888; }
figure.thumb figcaption { overflow-wrap: anywhere; margin-top: 3px; }
.outcome { font-weight: bold; }
form.filters { display: inline-block; margin-left: 1em; }
form.filters label { margin-right: 1em; }
.pager a, .pager span { margin-right: 1em; }
""".strip()


def escape(value: Any) -> str:
    return html.escape(str(value), quote=True)


def attributes(**values: Any) -> str:
    """``data-`` attributes (underscores as dashes), escaped."""
    return "".join(f' data-{name.replace("_", "-")}="{escape(value)}"' for name, value in values.items())


def cells(*values: Any, text: int = 0) -> str:
    """Table cells; the first ``text`` of them left-aligned text."""
    return "".join(
        f'<td class="text">{escape(value)}</td>' if index < text else f"<td>{escape(value)}</td>"
        for index, value in enumerate(values)
    )


def table(table_attributes: str, headers: list[str], rows: list[str]) -> str:
    head = "".join(f"<th>{escape(header)}</th>" for header in headers)
    return f"<table {table_attributes}><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"


def note(text: str, css: str = "note") -> str:
    return f'<p class="{css}">{escape(text)}</p>'


def section(anchor: str, title: str, parts: list[str]) -> str:
    return "\n".join([f'<section id="{anchor}">', f"<h2>{escape(title)}</h2>", *parts, "</section>"])


def chart(chart_id: str, figure: go.Figure, wide: bool = False) -> str:
    """A figure in its ``div`` (id ``chart_id``); plotly.js itself comes with the page."""
    body = figure.to_html(full_html=False, include_plotlyjs=False, div_id=chart_id, config=PLOTLY_CONFIG)
    return f'<div class="chart{" wide" if wide else ""}">{body}</div>'


def charts(*parts: str) -> list[str]:
    return ['<div class="charts">', *parts, "</div>"]


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "_", text)


def document(run_dir: Path, head: str, body: list[str], controls: str = "") -> str:
    """The whole page: ``head`` brings plotly.js (inline or from the server), ``body`` the sections,
    ``controls`` go in the navigation bar (which stays in view)."""
    nav = "".join(f'<a href="#{anchor}">{label}</a>' for anchor, label in SECTIONS) + controls
    return "\n".join(
        [
            "<!DOCTYPE html>",
            '<html lang="en">',
            f'<head><meta charset="utf-8"><title>{TITLE}: {escape(run_dir.resolve().name)}</title>',
            f"<style>{STYLE}</style>",
            head,
            "</head>",
            "<body>",
            f"<header><h1>{TITLE}</h1><p>Run folder {escape(run_dir.resolve())}</p></header>",
            f"<nav>{nav}</nav>",
            "<main>",
            *body,
            "</main>",
            "</body>",
            "</html>",
            "",
        ]
    )


def steps_section(data: RunData) -> str:
    """Every registered step: its status, counts and duration; what the run lacks, said once."""
    rows = []
    for state in data.steps():
        counts = state.counts
        seconds = MISSING if state.seconds is None else f"{state.seconds:.1f}"
        numbers = [counts.get(name, MISSING) for name in ("shards", "samples", "ok", "rejected")]
        status = state.status if state.present else "not in this run"
        css = "" if state.present else ' class="missing"'
        rows.append(
            f"<tr{attributes(step=state.name, status=state.status)}{css}>"
            f"{cells(state.name, status, *numbers, seconds, text=2)}</tr>"
        )
    headers = ["Step", "Status", "Shards", "Rows", "Kept", "Rejected", "Seconds"]
    parts = [table('id="steps-table"', headers, rows)]
    missing = data.missing_steps()
    if missing:
        message = (
            f"This run has no output of {', '.join(missing)}: the sections show what the other steps wrote."
        )
        parts.insert(0, f'<p class="warning" id="missing-steps">{escape(message)}</p>')
    return section("steps", "Steps", parts)


def funnel_section(data: RunData, dataset: str | None = None) -> str:
    """The rejection funnel, per step and per source dataset, as charts and as tables."""
    funnel = data.funnel(dataset)
    if not funnel:
        return section("funnel", "Rejection funnel", [note("No step of this run has committed rows yet.")])
    rows = []
    for step, counts in funnel.items():
        step_rows = sum(counts.values())
        rows += [
            f"<tr{attributes(step=step, outcome=outcome, count=count)}>"
            f"{cells(step, outcome, count, f'{100 * count / step_rows:.1f}%', text=2)}</tr>"
            for outcome, count in counts.items()
        ]
    scope = attributes(dataset=dataset) if dataset is not None else ""
    tables = [table(f'id="funnel-table"{scope}', ["Step", "Outcome", "Rows", "Share of step"], rows)]
    figure_parts = [chart("chart-funnel", figures.funnel_figure(funnel), wide=True)]
    notes = []
    if dataset is None:
        counts = data.funnel_by_dataset()
        figure_parts.append(chart("chart-funnel-datasets", figures.dataset_funnel_figure(counts), wide=True))
        tables.append(dataset_table(counts))
    else:
        notes.append(note(f"Dataset {dataset} only: steps without a dataset column are left out."))
    parts = [*notes, *charts(*figure_parts), f'<div class="tables">{"".join(tables)}</div>']
    return section("funnel", "Rejection funnel", parts)


def dataset_table(counts: list[DatasetCount]) -> str:
    rows = [
        f"<tr{attributes(step=count.step, dataset=count.dataset, outcome=count.outcome, count=count.count)}>"
        f"{cells(count.step, count.dataset, count.outcome, count.count, text=3)}</tr>"
        for count in counts
    ]
    return table('id="funnel-datasets-table"', ["Step", "Dataset (model)", "Outcome", "Rows"], rows)


def histograms_section(data: RunData, dataset: str | None = None) -> str:
    """Per step with sample records, a histogram of each metric its rows have, stacked by outcome."""
    steps = data.histogram_steps()
    if not steps:
        return section("histograms", "Face and quality histograms", [note("No step with sample records.")])
    parts = [
        note(
            "The values of every row that has them, kept and rejected, stacked by outcome: a threshold "
            "shows as the edge where a reject reason starts."
        )
    ]
    for step in steps:
        histograms = data.histograms(step, dataset)
        if not histograms:
            parts.append(note(f"{step}: no face or score filled in."))
            continue
        step_charts = [
            chart(f"chart-hist-{slug(step)}-{histogram.metric.name}", figures.histogram_figure(histogram))
            for histogram in histograms
        ]
        parts += [f"<h3>{escape(step)}</h3>", *charts(*step_charts)]
    return section("histograms", "Face and quality histograms", parts)


def captions_section(data: RunData, dataset: str | None = None) -> str:
    summary = data.caption_summary(dataset)
    if summary is None:
        return section("captions", "Captions", [note("No caption output in this run.")])
    parts = [chart("chart-caption-sources", figures.caption_sources_figure(summary))]
    if summary.lengths:
        parts.append(chart("chart-caption-lengths", figures.caption_lengths_figure(summary)))
    if summary.flags:
        parts.append(chart("chart-caption-flags", figures.caption_flags_figure(summary)))
    else:
        parts.append(note("No caption was flagged."))
    return section("captions", "Captions", charts(*parts))


def buckets_section(data: RunData, dataset: str | None = None) -> str:
    buckets = data.buckets(dataset)
    if not buckets:
        return section("buckets", "Aspect-ratio buckets", [note("No kept sample with a bucket in this run.")])
    return section(
        "buckets",
        "Aspect-ratio buckets",
        charts(chart("chart-buckets", figures.buckets_figure(buckets), wide=True)),
    )


def training_section(data: RunData) -> str:
    curves = data.training_curves()
    if not curves:
        return section("training", "Training", [note("No training step of this run has written metrics.")])
    metrics = [
        metric
        for metric in TRAINING_METRICS
        if any(metric in line for lines in curves.values() for line in lines)
    ]
    steps = ", ".join(f"{stage} ({len(lines)} optimiser steps)" for stage, lines in curves.items())
    return section(
        "training",
        "Training",
        [
            note(f"metrics.jsonl of {steps}."),
            *charts(
                *(
                    chart(f"chart-training-{metric}", figures.training_figure(curves, metric))
                    for metric in metrics
                )
            ),
        ],
    )


def metric_cell(metric: str, stats: dict[str, Any] | None) -> str:
    """An eval metric's mean and interval, the mean at full precision in ``data-mean``."""
    if stats is None:
        return f"<td{attributes(metric=metric)}>{MISSING}</td>"
    text = f"{stats['mean']:.3f}<br><small>[{stats['low']:.3f}, {stats['high']:.3f}]</small>"
    return f"<td{attributes(metric=metric, mean=repr(stats['mean']), count=stats['count'])}>{text}</td>"


def eval_section(data: RunData) -> str:
    """The eval summary: a table of each model's metrics, their means as a chart, the per-image scores."""
    summary = data.eval_summary()
    if summary is None:
        return section("eval", "Evaluation", [note("No eval report (eval/report/summary.json) in this run.")])
    models: dict[str, dict[str, Any]] = summary["models"]
    metrics = sorted({metric for stats in models.values() for metric in stats["metrics"]})
    rows = []
    for model, stats in models.items():
        extras = [MISSING if stats.get(name) is None else round(stats[name], 4) for name in EVAL_EXTRAS]
        rows.append(
            f"<tr{attributes(model=model)}>{cells(model, text=1)}"
            + "".join(metric_cell(metric, stats["metrics"].get(metric)) for metric in metrics)
            + f"{cells(*extras)}</tr>"
        )
    benchmark = summary.get("benchmark") or {}
    described = ", ".join(
        f"{benchmark[name]} {name}" for name in ("pairs", "identities", "prompts") if name in benchmark
    )
    parts = [
        note(f"Benchmark {described or 'not described'}. Cells: mean [95% bootstrap interval]."),
        table('id="eval-table"', ["Model", *metrics, *EVAL_EXTRAS], rows),
    ]
    eval_charts = []
    if metrics:
        eval_charts.append(chart("chart-eval-means", figures.eval_means_figure(summary), wide=True))
    scores = data.eval_scores()
    if scores and metrics:
        eval_charts.append(chart("chart-eval-scores", figures.eval_scores_figure(scores, metrics), wide=True))
    return section("eval", "Evaluation", [*parts, *charts(*eval_charts)])


def summary_sections(data: RunData, dataset: str | None = None) -> list[str]:
    """The sections before the thumbnails (which differ between snapshot and server)."""
    return [
        steps_section(data),
        funnel_section(data, dataset),
        histograms_section(data, dataset),
        captions_section(data, dataset),
        buckets_section(data, dataset),
    ]


def closing_sections(data: RunData) -> list[str]:
    """The sections after the thumbnails."""
    return [training_section(data), eval_section(data)]


def tile(item: Thumbnail, source: str | None) -> str:
    """A thumbnail tile; ``source`` is the image URL (``data:`` or served), None when there is none."""
    image = (
        f'<img src="{escape(source)}" alt="{escape(item.key)}">'
        if source
        else '<div class="no-image">no stored image</div>'
    )
    detail = f"<br>{escape(item.detail)}" if item.detail else ""
    css = "ok" if item.outcome == OK else "rejected"
    return (
        f'<figure class="thumb {css}"'
        f"{attributes(step=item.step, key=item.key, outcome=item.outcome, dataset=item.dataset)}>{image}"
        f'<figcaption><span class="outcome">{escape(item.outcome)}</span> · {escape(item.dataset)}'
        f"<br>{escape(item.key)}{detail}</figcaption></figure>"
    )


def data_uri(jpeg: bytes | None) -> str | None:
    return f"data:image/jpeg;base64,{base64.b64encode(jpeg).decode('ascii')}" if jpeg else None


def snapshot_thumbnails(data: RunData, per_outcome: int) -> str:
    """Per step with images and per outcome, up to ``per_outcome`` thumbnails as ``data:`` URIs."""
    steps = data.image_steps()
    if not steps:
        return section("thumbnails", "Thumbnails", [note("No step of this run stores images.")])
    parts = [
        note(
            f"Up to {per_outcome} rows per step and outcome, in key order; the served dashboard "
            "(infu dashboard RUN_DIR) pages through all of them."
        )
    ]
    for step in steps:
        groups = []
        for outcome, count in data.outcomes(step).items():
            page = data.thumbnails(step, outcome, limit=per_outcome)
            tiles = "".join(tile(item, data_uri(data.thumbnail_jpeg(item))) for item in page.items)
            groups.append(
                f"<div><h4>{escape(outcome)}: {len(page.items)} of {count} shown</h4>"
                f'<div class="grid"{attributes(step=step, outcome=outcome)}>{tiles}</div></div>'
            )
        parts += [
            f'<h3 id="thumbnails-{slug(step)}">{escape(step)}</h3>',
            f'<div class="outcomes">{"".join(groups)}</div>',
        ]
    return section("thumbnails", "Thumbnails of kept and rejected samples", parts)


THUMBNAILS_SCRIPT = """
async function showThumbnails(params) {
  for (const [name, value] of [...params]) if (!value) params.delete(name);
  const response = await fetch("/thumbnails?" + params);
  if (!response.ok) return;
  document.getElementById("thumbnails").outerHTML = await response.text();
  history.replaceState(null, "", "/?" + params + "#thumbnails");
}
document.addEventListener("change", event => {
  const form = event.target.closest("#thumbnail-filters");
  if (!form) return;
  if (event.target.name === "step") form.elements.reason.value = "";
  showThumbnails(new URLSearchParams(new FormData(form)));
});
document.addEventListener("click", event => {
  const link = event.target.closest("#thumbnails .pager a");
  if (!link) return;
  event.preventDefault();
  showThumbnails(new URL(link.href).searchParams);
});
""".strip()
"""The served page's thumbnail filters and pager: they fetch the thumbnails section again (``/thumbnails``)
instead of the whole page, and put the choice in the address bar; without scripts they load the page."""


def select(
    name: str, label: str, options: list[str], chosen: str | None, every: str | None, submits: bool = False
) -> str:
    """A labelled ``<select id="filter-<name>">``; ``every`` names the empty choice (no filter);
    ``submits``: a choice submits its form."""
    choices = [f'<option value="">{escape(every)}</option>'] if every else []
    for option in options:
        selected = " selected" if option == chosen else ""
        choices.append(f'<option value="{escape(option)}"{selected}>{escape(option)}</option>')
    submit = ' onchange="this.form.submit()"' if submits else ""
    return (
        f'<label>{escape(label)} <select name="{name}" id="filter-{name}"{submit}>'
        f"{''.join(choices)}</select></label>"
    )


def hidden(**values: str | None) -> str:
    return "".join(
        f'<input type="hidden" name="{name}" value="{escape(value)}">'
        for name, value in values.items()
        if value is not None
    )


def served_thumbnails(
    data: RunData,
    step: str | None,
    reason: str | None,
    dataset: str | None,
    page: int,
    page_size: int,
    link: Callable[..., str],
) -> str:
    """One page of a step's thumbnails, maybe of one outcome and dataset: the step and reason choices,
    links to the previous and next pages (``link(page=n)`` is the URL of page ``n``) and the tiles."""
    if step is None:
        return section("thumbnails", "Thumbnails", [note("No step of this run stores images.")])
    found = data.thumbnails(step, reason, dataset, offset=(page - 1) * page_size, limit=page_size)
    pages = max(1, -(-found.total // page_size))
    tiles = [
        tile(item, f"/thumbnail/{item.step}/{item.key}.jpg" if data.image_member(item) else None)
        for item in found.items
    ]
    pager = [f"<span>Page {page} of {pages} ({found.total} rows)</span>"]
    if page > 1:
        pager.insert(0, f'<a id="previous-page" href="{escape(link(page=page - 1))}">← previous</a>')
    if page < pages:
        pager.append(f'<a id="next-page" href="{escape(link(page=page + 1))}">next →</a>')
    form = (
        '<form class="filters" id="thumbnail-filters" method="get" action="/#thumbnails">'
        + hidden(dataset=dataset, page_size=str(page_size))
        + select("step", "Step", data.image_steps(), step, None)
        + select("reason", "Outcome / reject reason", list(data.outcomes(step)), reason, "every outcome")
        + '<button type="submit">Show</button></form>'
    )
    grid_attributes = attributes(
        step=step, reason=reason or "", dataset=dataset or "", page=page, pages=pages, total=found.total
    )
    grid = "".join(tiles) or "No row matches."
    return section(
        "thumbnails",
        f"Thumbnails{f' of dataset {dataset}' if dataset else ''}",
        [
            form,
            f'<p class="pager">{"".join(pager)}</p>',
            f'<div class="grid" id="thumbnail-grid"{grid_attributes}>{grid}</div>',
        ],
    )


def dataset_form(data: RunData, step: str | None, reason: str | None, dataset: str | None) -> str:
    """The served dashboard's dataset filter (every chart and the thumbnails): a choice loads the page."""
    return (
        '<form class="filters" id="dataset-filter" method="get" action="/">'
        + hidden(step=step, reason=reason)
        + select("dataset", "Dataset", data.datasets(), dataset, "every dataset", submits=True)
        + "</form>"
    )
