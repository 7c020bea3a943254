"""The evaluation report: Markdown and a self-contained HTML page from per-image scores and a summary.

:func:`render_report` writes ``report.md``, ``report.html`` and ``gallery/<model>_<metric>.png`` (each
model's worst cases: highest ID Loss, lowest CLIPScore) into an existing folder. Our models' means with
their bootstrap intervals sit beside :data:`PAPER_RESULTS`, the published numbers. The HTML page needs no
network and no scripts: CSS inline, galleries embedded as ``data:`` URIs, every cell carrying its full
precision value (``data-mean``) for tests. Equal inputs give byte-identical files (no timestamps).
"""

from __future__ import annotations

import base64
import html
import io
import math
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont, ImageOps

from infu.paths import write_atomic

PAPER_RESULTS: dict[str, dict[str, float]] = {
    "FLUX.1-dev (paper)": {"clip_score": 0.334},
    "FLUX.1-dev IP-Adapter (paper)": {"id_loss": 0.772, "clip_score": 0.243, "pick_score": 0.204},
    "PuLID-FLUX (paper)": {"id_loss": 0.225, "clip_score": 0.286, "pick_score": 0.212},
    "InfU (paper)": {"id_loss": 0.209, "clip_score": 0.318, "pick_score": 0.221},
    "InfU w/o multi-stage (paper)": {"id_loss": 0.172, "clip_score": 0.292, "pick_score": 0.212},
    "InfU w/o SPMS (paper)": {"id_loss": 0.368, "clip_score": 0.303, "pick_score": 0.220},
    "InfU w/ IPA (paper)": {"id_loss": 0.180, "clip_score": 0.241, "pick_score": 0.199},
    "Infinite-ID (paper)": {"clip_t": 0.340, "clip_i": 0.913, "face_similarity": 0.689},
    "Infinite-ID w/o identity-enhanced training (paper)": {
        "clip_t": 0.329,
        "clip_i": 0.891,
        "face_similarity": 0.593,
    },
    "Infinite-ID mutual attention (paper)": {"clip_t": 0.316, "clip_i": 0.808, "face_similarity": 0.398},
}
"""Reference numbers, shown alongside ours: row name -> metric key -> value. ID Loss, CLIPScore and
PickScore from the InfU paper's Table 1 (FLUX.1-dev alone: CLIPScore only) and its ablations (w/o
multi-stage training, w/o SPMS data, w/ IP-Adapter); CLIP-T, CLIP-I and face similarity from the
Infinite-ID paper and its ablations (w/o identity-enhanced training, mutual instead of mixed
attention)."""

METRICS: tuple[tuple[str, str, bool], ...] = (
    ("id_loss", "ID Loss", False),
    ("clip_score", "CLIPScore", True),
    ("pick_score", "PickScore", True),
    ("clip_t", "CLIP-T", True),
    ("clip_i", "CLIP-I", True),
    ("face_similarity", "Face sim.", True),
)
"""The report's metric columns: (key in rows and summary, label, whether higher is better)."""
_LABELS = {key: label for key, label, _ in METRICS}

GALLERIES: tuple[tuple[str, bool], ...] = (("id_loss", True), ("clip_score", False))
"""Each model's worst-case galleries: (metric, whether its highest values are the worst)."""
LABEL_HEIGHT = 18
"""Pixels under each thumbnail of :func:`image_grid` for its label."""
MISSING = "—"
"""What a cell without a number shows."""

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; }
table { border-collapse: collapse; margin: 1em 0; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.6em; text-align: right; }
th:first-child, td:first-child, td.text { text-align: left; }
thead th { background: #f2f2f2; }
td.best { background: #d9f2d9; font-weight: bold; }
.note { color: #555; max-width: 60em; }
figure { margin: 1em 0; }
figure img { max-width: 100%; border: 1px solid #ccc; }
""".strip()


def worst_cases(rows: list[dict], metric: str, count: int, highest: bool) -> list[dict]:
    """The ``count`` rows of status ``ok`` with a value for ``metric`` that score worst: highest values
    first when ``highest``, else lowest first; ties in key order."""
    scored = [row for row in rows if row["status"] == "ok" and row.get(metric) is not None]
    ordered = sorted(scored, key=lambda row: (-row[metric] if highest else row[metric], row["key"]))
    return ordered[: max(count, 0)]


def image_grid(images: list[tuple[bytes, str]], columns: int = 4, cell: int = 192) -> bytes:
    """PNG of a grid of thumbnails: each encoded image fitted into ``cell`` x ``cell`` (aspect kept,
    centred) with its label under it. ``min(columns, len(images))`` columns, each row ``cell`` +
    :data:`LABEL_HEIGHT` pixels high."""
    if not images:
        raise ValueError("image_grid needs at least one image")
    used = min(columns, len(images))
    rows = math.ceil(len(images) / used)
    height = cell + LABEL_HEIGHT
    grid = Image.new("RGB", (used * cell, rows * height), "white")
    draw = ImageDraw.Draw(grid)
    font = ImageFont.load_default()
    for index, (data, label) in enumerate(images):
        left, top = (index % used) * cell, (index // used) * height
        with Image.open(io.BytesIO(data)) as image:
            thumb = ImageOps.contain(image.convert("RGB"), (cell, cell))
        grid.paste(thumb, (left + (cell - thumb.width) // 2, top + (cell - thumb.height) // 2))
        text = _fit(draw, label, font, cell - 4)
        draw.text(
            (left + cell / 2, top + cell + LABEL_HEIGHT / 2), text, fill="black", font=font, anchor="mm"
        )
    buffer = io.BytesIO()
    grid.save(buffer, "PNG")
    return buffer.getvalue()


def _fit(draw: ImageDraw.ImageDraw, text: str, font: Any, width: float) -> str:
    """``text``, cut short with ``...`` until it fits ``width`` pixels."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "...", font=font) > width:
        text = text[:-1]
    return text + "..."


def render_report(
    rows: list[dict],
    summary: dict,
    out_dir: Path,
    image_bytes: Callable[[dict], bytes],
    worst: int = 8,
) -> dict[str, Path]:
    """Write ``report.md``, ``report.html`` and the worst-case galleries into ``out_dir`` (which exists).

    Returns ``{"markdown": path, "html": path, "gallery/<model>_<metric>.png": path, ...}``; a model
    with no scored image for a gallery's metric gets none.
    """
    out_dir = Path(out_dir)
    models: dict[str, dict] = summary["models"]
    slugs = _slugs(models)
    galleries: list[_Gallery] = []
    for model in models:
        model_rows = [row for row in rows if row["model"] == model]
        for metric, highest in GALLERIES:
            cases = worst_cases(model_rows, metric, worst, highest)
            if not cases:
                continue
            png = image_grid(
                [
                    (image_bytes(row), f"{row['identity']} / {row['prompt_id']}: {row[metric]:.3f}")
                    for row in cases
                ]
            )
            galleries.append(
                _Gallery(model, metric, highest, f"gallery/{slugs[model]}_{metric}.png", cases, png)
            )
    written: dict[str, Path] = {}
    if galleries:
        (out_dir / "gallery").mkdir(exist_ok=True)
    for gallery in galleries:
        path = out_dir / gallery.name
        write_atomic(path, gallery.png)
        written[gallery.name] = path
    markdown, page = out_dir / "report.md", out_dir / "report.html"
    write_atomic(markdown, _markdown(summary, galleries).encode())
    write_atomic(page, _html(summary, galleries).encode())
    return {"markdown": markdown, "html": page, **written}


@dataclass(frozen=True)
class _Gallery:
    """One worst-case gallery: its model and metric, file name, the rows shown and the PNG."""

    model: str
    metric: str
    highest: bool
    name: str
    cases: list[dict]
    png: bytes

    @property
    def title(self) -> str:
        """E.g. ``InfU: highest ID Loss``."""
        return f"{self.model}: {'highest' if self.highest else 'lowest'} {_LABELS[self.metric]}"


def _slugs(models: Iterable[str]) -> dict[str, str]:
    """File-name-safe model names; two models mapping to one name are an error."""
    slugs = {model: re.sub(r"[^A-Za-z0-9_.-]+", "_", model) for model in models}
    if len(set(slugs.values())) < len(slugs):
        raise ValueError(f"model names collide as file names: {sorted(slugs)}")
    return slugs


def _interval(stats: dict | None) -> str:
    """``mean [low, high]`` at 3 decimals, or :data:`MISSING`."""
    if stats is None:
        return MISSING
    return f"{stats['mean']:.3f} [{stats['low']:.3f}, {stats['high']:.3f}]"


def _number(value: float | int | None, digits: int) -> str:
    return MISSING if value is None else f"{value:.{digits}f}"


def _extras(stats: dict) -> list[str]:
    """The images, scored, no face, FID and LPIPS diversity cells of one model."""
    return [
        str(stats["images"]),
        str(stats["scored"]),
        str(stats["no_face"]),
        _number(stats.get("fid"), 2),
        _number(stats.get("lpips_diversity"), 3),
    ]


_EXTRA_HEADERS = ("Images", "Scored", "No face", "FID", "LPIPS div.")


def _best(models: dict[str, dict]) -> dict[str, set[str]]:
    """Metric key -> the models with its best mean (ties share), when at least two models have it."""
    best: dict[str, set[str]] = {}
    for key, _, higher in METRICS:
        means = {
            model: stats["metrics"][key]["mean"] for model, stats in models.items() if key in stats["metrics"]
        }
        if len(means) >= 2:
            target = max(means.values()) if higher else min(means.values())
            best[key] = {model for model, mean in means.items() if mean == target}
    return best


def _header_label(label: str, higher: bool) -> str:
    return f"{label} {'↑' if higher else '↓'}"


def _benchmark_line(benchmark: dict) -> str:
    return (
        f"Benchmark v{benchmark['version']} (fingerprint {benchmark['fingerprint']}): {benchmark['pairs']} "
        f"pairs, {benchmark['identities']} identities, {benchmark['prompts']} prompts."
    )


_NOTES = (
    "ID Loss = 1 - cosine of the identity embeddings of the reference photo's and the generated image's "
    "largest faces (lower is better); an image without a face scores 2.0 and is counted in the mean "
    "(column No face).",
    "Intervals: 95% bootstrap over prompts and identities (both resampled). Scored: images with scores "
    "(the others were rejected). Best of our models (at least two) in bold.",
)
_REFERENCE_NOTE = (
    "As published, on the papers' own benchmarks: ID Loss, CLIPScore, PickScore from InfU Table 1 and its "
    "ablations; CLIP-T, CLIP-I, face similarity from Infinite-ID and its ablations."
)


def _md_text(text: str) -> str:
    """Text safe in a Markdown table cell: HTML escaped, pipes escaped, on one line."""
    return html.escape(" ".join(str(text).split()), quote=False).replace("|", "\\|")


def _md_table(headers: list[str], body: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    return lines + ["| " + " | ".join(cells) + " |" for cells in body]


def _markdown(summary: dict, galleries: list[_Gallery]) -> str:
    models: dict[str, dict] = summary["models"]
    best = _best(models)
    metric_headers = [_header_label(label, higher) for _, label, higher in METRICS]
    ours = []
    for model, stats in models.items():
        cells = [_md_text(model)]
        for key, _, _ in METRICS:
            cell = _interval(stats["metrics"].get(key))
            cells.append(f"**{cell}**" if model in best.get(key, ()) else cell)
        ours.append(cells + _extras(stats))
    reference = [
        [_md_text(name)] + [_number(values.get(key), 3) for key, _, _ in METRICS]
        for name, values in PAPER_RESULTS.items()
    ]
    lines = ["# Evaluation report", "", _benchmark_line(summary["benchmark"]), ""]
    lines += _md_table(["Model", *metric_headers, *_EXTRA_HEADERS], ours)
    lines += ["", _NOTES[0], "", _NOTES[1], "", "## Reference (papers)", ""]
    lines += _md_table(["Model", *metric_headers], reference)
    lines += ["", _REFERENCE_NOTE, "", "## Worst cases", ""]
    if not galleries:
        lines += ["No scored image.", ""]
    for gallery in galleries:
        lines += [f"### {_md_text(gallery.title)}", "", f"![{_md_text(gallery.title)}]({gallery.name})", ""]
        body = [
            [
                str(rank),
                _md_text(row["identity"]),
                _md_text(row["prompt_id"]),
                f"{row[gallery.metric]:.3f}",
                _md_text(row["prompt"]),
            ]
            for rank, row in enumerate(gallery.cases, 1)
        ]
        lines += _md_table(["#", "Identity", "Prompt id", _LABELS[gallery.metric], "Prompt"], body) + [""]
    return "\n".join(lines)


def _e(text: Any) -> str:
    return html.escape(str(text), quote=True)


def _metric_cell(key: str, stats: dict | None, best: bool) -> str:
    """One metric cell of our table, its numbers in ``data-`` attributes at full precision."""
    css = ' class="best"' if best else ""
    if stats is None:
        return f'<td data-metric="{_e(key)}">{MISSING}</td>'
    data = "".join(f' data-{name}="{float(stats[name])!r}"' for name in ("mean", "low", "high"))
    data += f' data-count="{int(stats["count"])}"'
    return f'<td data-metric="{_e(key)}"{data}{css}>{_e(_interval(stats))}</td>'


def _html_table(attributes: str, headers: list[str], body: list[str]) -> list[str]:
    head = "".join(f"<th>{_e(header)}</th>" for header in headers)
    return [
        f"<table {attributes}>",
        f"<thead><tr>{head}</tr></thead>",
        "<tbody>",
        *body,
        "</tbody>",
        "</table>",
    ]


def _html(summary: dict, galleries: list[_Gallery]) -> str:
    models: dict[str, dict] = summary["models"]
    best = _best(models)
    metric_headers = [_header_label(label, higher) for _, label, higher in METRICS]
    ours = []
    for model, stats in models.items():
        cells = "".join(
            _metric_cell(key, stats["metrics"].get(key), model in best.get(key, ())) for key, _, _ in METRICS
        )
        extras = "".join(f"<td>{_e(cell)}</td>" for cell in _extras(stats))
        ours.append(f'<tr data-model="{_e(model)}"><th scope="row">{_e(model)}</th>{cells}{extras}</tr>')
    reference = []
    for name, values in PAPER_RESULTS.items():
        cells = "".join(
            f'<td data-metric="{key}" data-value="{values[key]!r}">{values[key]:.3f}</td>'
            if key in values
            else f'<td data-metric="{key}">{MISSING}</td>'
            for key, _, _ in METRICS
        )
        reference.append(f'<tr data-model="{_e(name)}"><th scope="row">{_e(name)}</th>{cells}</tr>')
    title = "Evaluation report"
    lines = [
        "<!DOCTYPE html>",
        '<html lang="en">',
        f'<head><meta charset="utf-8"><title>{title}</title><style>{_STYLE}</style></head>',
        "<body>",
        f"<h1>{title}</h1>",
        f"<p>{_e(_benchmark_line(summary['benchmark']))}</p>",
    ]
    lines += _html_table('id="ours"', ["Model", *metric_headers, *_EXTRA_HEADERS], ours)
    lines += [f'<p class="note">{_e(note)}</p>' for note in _NOTES]
    lines += ["<h2>Reference (papers)</h2>"]
    lines += _html_table('id="reference"', ["Model", *metric_headers], reference)
    lines += [f'<p class="note">{_e(_REFERENCE_NOTE)}</p>', "<h2>Worst cases</h2>"]
    if not galleries:
        lines.append("<p>No scored image.</p>")
    for gallery in galleries:
        data = base64.b64encode(gallery.png).decode("ascii")
        lines += [
            f"<h3>{_e(gallery.title)}</h3>",
            f'<figure><img src="data:image/png;base64,{data}" alt="{_e(gallery.title)}">'
            f"<figcaption>{_e(gallery.name)}</figcaption></figure>",
        ]
        body = [
            f'<tr data-key="{_e(row["key"])}"><td>{rank}</td><td class="text">{_e(row["identity"])}</td>'
            f'<td class="text">{_e(row["prompt_id"])}</td><td>{row[gallery.metric]:.3f}</td>'
            f'<td class="text">{_e(row["prompt"])}</td></tr>'
            for rank, row in enumerate(gallery.cases, 1)
        ]
        headers = ["#", "Identity", "Prompt id", _LABELS[gallery.metric], "Prompt"]
        lines += _html_table('class="cases"', headers, body)
    lines += ["</body>", "</html>", ""]
    return "\n".join(lines)
