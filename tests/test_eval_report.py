"""The evaluation report: Markdown and HTML tables, escaping, worst-case galleries, determinism."""

from __future__ import annotations

import io
from html.parser import HTMLParser
from pathlib import Path

import pytest
from PIL import Image

from eval.report import LABEL_HEIGHT, METRICS, MISSING, PAPER_RESULTS, image_grid, render_report, worst_cases

SCRIPT_PROMPT = "<script>alert(\"x\")</script> & 'quoted' | piped"
COLORS = [(200, 0, 0), (0, 200, 0), (0, 0, 200), (200, 200, 0), (0, 200, 200)]


def _png(color: tuple[int, int, int], size: tuple[int, int] = (24, 16)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, "PNG")
    return buffer.getvalue()


def _row(model: str, index: int, id_loss: float | None, clip_score: float | None, status: str = "ok") -> dict:
    return {
        "key": f"{model}/{index:03d}",
        "model": model,
        "identity": f"id{index % 2:02d}",
        "gender": "woman",
        "prompt_id": f"p{index:03d}",
        "prompt": SCRIPT_PROMPT if index == 0 else f"a woman in a garden, take {index}",
        "status": status,
        "reject_reason": None if status == "ok" else "nsfw",
        "id_loss": id_loss,
        "clip_score": clip_score,
        "pick_score": 0.2,
        "clip_t": 0.3,
        "clip_i": 0.8,
        "face_similarity": None if id_loss is None else 1 - id_loss,
        "faces": 1,
    }


def _stats(mean: float, low: float, high: float, count: int = 5) -> dict:
    return {"mean": mean, "low": low, "high": high, "count": count}


@pytest.fixture
def rows() -> list[dict]:
    infu = [_row("InfU", index, 0.1 * index, 0.30 + 0.01 * index) for index in range(5)]
    baseline = [_row("base/line", index, 0.5 + 0.05 * index, 0.25) for index in range(3)]
    baseline.append(_row("base/line", 3, None, None, status="rejected"))
    return infu + baseline


@pytest.fixture
def summary() -> dict:
    return {
        "benchmark": {"version": 1, "fingerprint": "abc123", "pairs": 8, "identities": 2, "prompts": 5},
        "models": {
            "InfU": {
                "images": 5,
                "scored": 5,
                "no_face": 1,
                "metrics": {
                    "id_loss": _stats(0.2123456789, 0.15, 0.27),
                    "clip_score": _stats(0.3201234, 0.31, 0.33),
                    "pick_score": _stats(0.21, 0.2, 0.22),
                    "clip_t": _stats(0.33, 0.32, 0.34),
                    "clip_i": _stats(0.9, 0.88, 0.92),
                    "face_similarity": _stats(0.7, 0.65, 0.75),
                },
                "fid": 12.3456,
                "lpips_diversity": 0.4567,
            },
            "base/line": {
                "images": 4,
                "scored": 3,
                "no_face": 0,
                "metrics": {
                    "id_loss": _stats(0.5512, 0.5, 0.6, 3),
                    "clip_score": _stats(0.2500004, 0.24, 0.26, 3),
                    "clip_t": _stats(0.35, 0.34, 0.36, 3),
                    "clip_i": _stats(0.8, 0.78, 0.82, 3),
                    "face_similarity": _stats(0.45, 0.4, 0.5, 3),
                },
                "fid": None,
                "lpips_diversity": None,
            },
        },
    }


def _image_bytes(row: dict) -> bytes:
    return _png(COLORS[int(row["prompt_id"][1:]) % len(COLORS)])


class _Page(HTMLParser):
    """What the tests read from the report's HTML: cells by table, tags, image sources, text."""

    def __init__(self) -> None:
        super().__init__()
        self.table: str | None = None
        self.model: str | None = None
        self.cells: dict[tuple[str, str, str], dict[str, str | None]] = {}
        self.tags: set[str] = set()
        self.sources: list[str] = []
        self.text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attributes = dict(attrs)
        self.tags.add(tag)
        if tag == "table":
            self.table = attributes.get("id") or attributes.get("class")
        elif tag == "tr":
            self.model = attributes.get("data-model")
        elif tag == "td" and "data-metric" in attributes and self.table and self.model:
            self.cells[(self.table, self.model, attributes["data-metric"] or "")] = attributes
        elif tag == "img":
            self.sources.append(attributes.get("src") or "")

    def handle_endtag(self, tag: str) -> None:
        if tag == "table":
            self.table = None

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def _parse(path: Path) -> _Page:
    page = _Page()
    page.feed(path.read_text())
    page.close()
    return page


def _markdown_row(markdown: str, name: str) -> list[str]:
    """The cells of the first Markdown table row whose first cell is ``name``."""
    for line in markdown.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split(" | ")]
        if line.startswith("|") and cells[0] == name:
            return cells
    raise AssertionError(f"no row {name}")


def test_markdown_has_our_intervals_and_the_paper_rows(tmp_path, rows, summary):
    markdown = render_report(rows, summary, tmp_path, _image_bytes)["markdown"].read_text()
    assert "Benchmark v1 (fingerprint abc123): 8 pairs, 2 identities, 5 prompts." in markdown
    infu = _markdown_row(markdown, "InfU")
    assert infu[1:3] == ["**0.212 [0.150, 0.270]**", "**0.320 [0.310, 0.330]**"]
    assert infu[7:] == ["5", "5", "1", "12.35", "0.457"]
    baseline = _markdown_row(markdown, "base/line")
    assert baseline[1] == "0.551 [0.500, 0.600]"
    assert baseline[3] == MISSING  # no PickScore for this model
    assert baseline[7:] == ["4", "3", "0", MISSING, MISSING]
    assert "## Reference (papers)" in markdown
    assert _markdown_row(markdown, "InfU (paper)")[1:] == [
        "0.209",
        "0.318",
        "0.221",
        MISSING,
        MISSING,
        MISSING,
    ]
    assert _markdown_row(markdown, "FLUX.1-dev (paper)")[1:3] == [MISSING, "0.334"]
    assert _markdown_row(markdown, "Infinite-ID (paper)")[4:] == ["0.340", "0.913", "0.689"]
    assert all(f"| {name} |" in markdown for name in PAPER_RESULTS)
    assert "an image without a face scores 2.0" in markdown
    assert "95% bootstrap over prompts and identities" in markdown
    assert "![InfU: highest ID Loss](gallery/InfU_id_loss.png)" in markdown
    assert "![base/line: lowest CLIPScore](gallery/base_line_clip_score.png)" in markdown


def test_html_numbers_best_cells_and_self_contained(tmp_path, rows, summary):
    page = _parse(render_report(rows, summary, tmp_path, _image_bytes)["html"])
    for model, stats in summary["models"].items():
        for key, _, _ in METRICS:
            cell = page.cells[("ours", model, key)]
            if key in stats["metrics"]:
                assert float(cell["data-mean"] or "") == stats["metrics"][key]["mean"]
                assert float(cell["data-high"] or "") == stats["metrics"][key]["high"]
            else:
                assert "data-mean" not in cell
    best = {key: model for (table, model, key), cell in page.cells.items() if cell.get("class") == "best"}
    # lower is better for ID Loss, higher for CLIPScore and CLIP-T; PickScore has one model: no best
    assert best["id_loss"] == "InfU" and best["clip_score"] == "InfU" and best["clip_t"] == "base/line"
    assert "pick_score" not in best
    assert float(page.cells[("reference", "PuLID-FLUX (paper)", "id_loss")]["data-value"] or "") == 0.225
    assert page.sources and all(source.startswith("data:image/png;base64,") for source in page.sources)
    assert not page.tags & {"script", "link", "iframe"}
    assert SCRIPT_PROMPT in "".join(page.text)


def test_text_is_escaped(tmp_path, rows, summary):
    paths = render_report(rows, summary, tmp_path, _image_bytes)
    page, markdown = paths["html"].read_text(), paths["markdown"].read_text()
    assert "<script>" not in page and "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt; &amp; &#x27;" in page
    assert "<script>" not in markdown and "&lt;script&gt;" in markdown and r"\| piped" in markdown


def test_galleries_are_grids_of_the_worst_cases(tmp_path, rows, summary):
    paths = render_report(rows, summary, tmp_path, _image_bytes, worst=3)
    assert set(paths) == {
        "markdown",
        "html",
        "gallery/InfU_id_loss.png",
        "gallery/InfU_clip_score.png",
        "gallery/base_line_id_loss.png",
        "gallery/base_line_clip_score.png",
    }
    for name in ("gallery/InfU_id_loss.png", "gallery/base_line_clip_score.png"):
        assert paths[name] == tmp_path / name
        with Image.open(paths[name]) as grid:
            assert grid.format == "PNG" and grid.size == (3 * 192, 192 + LABEL_HEIGHT)
            grid = grid.convert("RGB")
            # highest ID Loss of InfU first: p004; lowest CLIPScore of base/line, all tied: key order, p000
            first = COLORS[4] if name.startswith("gallery/InfU") else COLORS[0]
            assert grid.getpixel((96, 96)) == first


def test_image_grid_layout(tmp_path):
    images = [(_png(color, (40, 20)), f"image {index}") for index, color in enumerate(COLORS)]
    with Image.open(io.BytesIO(image_grid(images, columns=3, cell=32))) as grid:
        assert grid.size == (3 * 32, 2 * (32 + LABEL_HEIGHT))
        # each thumbnail fitted (aspect kept: 32 x 16) and centred in its cell
        assert grid.getpixel((16, 16)) == COLORS[0] and grid.getpixel((16, 4)) == (255, 255, 255)
        assert grid.getpixel((32 + 16, 32 + LABEL_HEIGHT + 16)) == COLORS[4]
    with Image.open(io.BytesIO(image_grid(images[:2], cell=20))) as grid:
        assert grid.size == (2 * 20, 20 + LABEL_HEIGHT)
    with pytest.raises(ValueError):
        image_grid([])


def test_worst_cases_order_and_ties():
    rows = [
        {"key": "c", "status": "ok", "id_loss": 0.5},
        {"key": "a", "status": "ok", "id_loss": 0.5},
        {"key": "b", "status": "ok", "id_loss": 0.9},
        {"key": "d", "status": "rejected", "id_loss": 2.0},
        {"key": "e", "status": "ok", "id_loss": None},
        {"key": "f", "status": "ok", "id_loss": 0.1},
    ]
    assert [row["key"] for row in worst_cases(rows, "id_loss", 3, highest=True)] == ["b", "a", "c"]
    assert [row["key"] for row in worst_cases(rows, "id_loss", 3, highest=False)] == ["f", "a", "c"]
    assert [row["key"] for row in worst_cases(rows, "id_loss", 10, highest=True)] == ["b", "a", "c", "f"]
    assert worst_cases(rows, "id_loss", 0, highest=True) == []


def test_rendering_is_deterministic(tmp_path, rows, summary):
    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir()
    second.mkdir()
    one = render_report(rows, summary, first, _image_bytes)
    two = render_report(rows, summary, second, _image_bytes)
    assert set(one) == set(two)
    for name in one:
        assert one[name].read_bytes() == two[name].read_bytes()
    assert sorted(path.name for path in first.rglob("*")) == sorted(path.name for path in second.rglob("*"))
