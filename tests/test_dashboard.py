"""The data-quality dashboard over a complete pipeline run: its numbers against the Parquet shards, a
partial run, the self-contained snapshot and the served app's filters and pages."""

from __future__ import annotations

import io
import math
from collections import Counter
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from flows.dashboard import create_app, write_snapshot
from flows.dashboard.data import OK, THUMBNAIL_SIDE, RunData
from flows.dashboard.figures import CURVE_POINTS, histogram_figure, training_figure
from flows.dashboard.server import MAX_PAGE_SIZE
from flows.dashboard.snapshot import THUMBNAILS_PER_OUTCOME
from infu.captions import CAPTION_SOURCES
from infu.index import DatasetIndex
from infu.manifest import read_manifest
from infu.paths import package_file
from infu.shards import parquet_paths, read_stats

SAMPLE_STEPS = ("ingest", "filter", "synth", "spms")
"""The steps whose shards hold sample records (SPMS pairs included)."""
LARGEST_FACE_VALUES = {
    "face_size": lambda face: min(face["bbox"][2] - face["bbox"][0], face["bbox"][3] - face["bbox"][1]),
    "detection_score": lambda face: face["score"],
    "yaw": lambda face: face["yaw"],
    "pitch": lambda face: face["pitch"],
}


@pytest.fixture(scope="module")
def run_dir(pipeline_run) -> Path:
    return Path(pipeline_run.run_dir)


@pytest.fixture(scope="module")
def data(run_dir) -> RunData:
    return RunData(run_dir)


@pytest.fixture(scope="module")
def snapshot(run_dir) -> str:
    return write_snapshot(run_dir).read_text()


@pytest.fixture(scope="module")
def client(run_dir) -> TestClient:
    return TestClient(create_app(run_dir))


class Elements(HTMLParser):
    """Every start tag of a page with its attributes."""

    def __init__(self, page: str):
        super().__init__()
        self.found: list[tuple[str, dict[str, str | None]]] = []
        self.feed(page)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.found.append((tag, dict(attrs)))

    def with_attribute(self, tag: str, name: str) -> list[dict[str, str | None]]:
        return [attributes for found, attributes in self.found if found == tag and name in attributes]


def funnel_table(page: str) -> dict[str, dict[str, int]]:
    """Step -> outcome -> rows, as the page's funnel table says."""
    table: dict[str, dict[str, int]] = {}
    for row in Elements(page).with_attribute("tr", "data-outcome"):
        if "data-dataset" not in row:
            table.setdefault(row["data-step"], {})[row["data-outcome"]] = int(row["data-count"])
    return table


def outcome_counts(rows: list[dict]) -> dict[str, int]:
    return dict(Counter(row["reject_reason"] or row["status"] for row in rows))


def test_funnel_is_the_index_reason_counts_of_every_step(run_dir, data):
    funnel = data.funnel()
    present = [step for step in data.present_steps() if parquet_paths(run_dir / step)]
    assert set(funnel) == set(present) and {"ingest", "filter", "caption", "spms", "eval"} <= set(funnel)
    for step in present:
        if step in SAMPLE_STEPS:
            assert funnel[step] == DatasetIndex(run_dir / step).reason_counts(), step
        elif step == "caption":
            rows = [row for path in parquet_paths(run_dir / step) for row in pq.read_table(path).to_pylist()]
            uncaptioned = sum(all(row[source] is None for source in CAPTION_SOURCES) for row in rows)
            assert funnel[step] == {
                OK: len(rows) - uncaptioned,
                **({"no_caption": uncaptioned} if uncaptioned else {}),
            }
        else:
            columns = ["status", "reject_reason"]
            rows = [
                row
                for path in parquet_paths(run_dir / step)
                for row in pq.read_table(path, columns=columns).to_pylist()
            ]
            assert funnel[step] == outcome_counts(rows), step
        assert list(funnel[step])[0] == OK or OK not in funnel[step]
        # the same totals as the shards' own stats, summed in the step's manifest
        counts = read_manifest(run_dir / step)["counts"]
        rejected = {outcome: count for outcome, count in funnel[step].items() if outcome != OK}
        assert (funnel[step].get(OK, 0), rejected) == (counts["ok"], counts["reasons"]), step


def test_funnel_per_dataset_adds_up_to_the_step_funnel(run_dir, data):
    per_dataset = data.funnel_by_dataset()
    for step, counts in data.funnel().items():
        summed = Counter()
        for count in per_dataset:
            if count.step == step:
                summed[count.outcome] += count.count
        assert dict(summed) == counts, step
    for step in SAMPLE_STEPS:
        expected = {
            (row["dataset"], row["outcome"]): row["n"]
            for row in DatasetIndex(run_dir / step).query(
                "SELECT dataset, coalesce(reject_reason, status) AS outcome, count(*) AS n"
                " FROM samples GROUP BY 1, 2"
            )
        }
        assert {
            (count.dataset, count.outcome): count.count for count in per_dataset if count.step == step
        } == expected
    dataset = data.datasets()[0]
    assert data.funnel(dataset)["filter"] == {
        count.outcome: count.count
        for count in per_dataset
        if (count.step, count.dataset) == ("filter", dataset)
    }
    assert data.funnel("no such dataset") == {}


@pytest.mark.parametrize("step", ["filter", "spms"])
def test_histograms_count_every_row_with_a_value(run_dir, data, step):
    records = DatasetIndex(run_dir / step).table(["faces", "scores", "status", "reject_reason"]).to_pylist()
    histograms = {histogram.metric.name: histogram for histogram in data.histograms(step)}
    expected_metrics = {"face_size", "detection_score", "yaw", "pitch", "aesthetic", "nsfw"}
    expected_metrics |= (
        {"sharpness", "watermark"} if step == "filter" else {"identity_similarity", "copy_paste"}
    )
    assert expected_metrics <= set(histograms)
    for name, histogram in histograms.items():
        values: dict[str, list[float]] = {}
        for record in records:
            if name in LARGEST_FACE_VALUES:
                value = LARGEST_FACE_VALUES[name](record["faces"][0]) if record["faces"] else None
            else:
                value = dict(record["scores"] or {}).get(name)
            if value is not None and math.isfinite(value):
                values.setdefault(record["reject_reason"] or record["status"], []).append(value)
        assert {outcome: sum(counts) for outcome, counts in histogram.counts.items()} == {
            outcome: len(found) for outcome, found in values.items()
        }, name
        everything = [value for found in values.values() for value in found]
        assert histogram.edges[0] == pytest.approx(min(everything))
        assert histogram.edges[-1] == pytest.approx(
            max(everything) if len(histogram.edges) > 2 else min(everything) + 1
        )
        binned, _ = np.histogram(everything, bins=histogram.edges)
        assert [sum(bins) for bins in zip(*histogram.counts.values(), strict=True)] == binned.tolist(), name
        figure = histogram_figure(histogram)
        assert {trace.name: sum(trace.y) for trace in figure.data} == {
            outcome: len(found) for outcome, found in values.items()
        }


def test_caption_summary_matches_the_caption_shards_stats(run_dir, data):
    summary = data.caption_summary()
    stats = [shard["captions"] for shard in read_stats(run_dir / "caption")]
    for source, counts in summary.sources.items():
        assert counts == {
            "stored": sum(shard[source]["count"] for shard in stats),
            "dropped": sum(shard[source]["dropped"] for shard in stats),
            "missing": sum(shard[source]["missing"] for shard in stats),
        }, source
        flags = Counter()
        for shard in stats:
            flags.update(shard[source]["flags"])
        assert {row["flag"]: row["count"] for row in summary.flags if row["source"] == source} == dict(flags)
        lengths = [row for row in summary.lengths if row["source"] == source]
        assert sum(row["captions"] for row in lengths) == counts["stored"]
        words = sum(row["words"] * row["captions"] for row in lengths)
        mean_words = [shard[source]["mean_words"] * shard[source]["count"] for shard in stats]
        assert words == pytest.approx(sum(mean_words), abs=0.01 * len(stats))
    assert set(summary.sources) == set(read_manifest(run_dir / "caption")["sources"])


def test_buckets_count_the_kept_samples(run_dir, data):
    buckets = data.buckets()
    for step in ("filter", "spms"):
        records = DatasetIndex(run_dir / step).table(["status", "bucket_width", "bucket_height"]).to_pylist()
        expected = Counter(
            (record["bucket_width"], record["bucket_height"])
            for record in records
            if record["status"] == OK and record["bucket_width"] is not None
        )
        assert {
            (row["width"], row["height"]): row["samples"] for row in buckets if row["step"] == step
        } == expected
        assert sum(expected.values()) == read_manifest(run_dir / step)["counts"]["ok"]


def test_training_curves_and_eval_summary_are_read_as_written(run_dir, data):
    curves = data.training_curves()
    assert set(curves) == {"stage1", "stage2"}
    for stage, lines in curves.items():
        manifest = read_manifest(run_dir / stage)
        assert [line["step"] for line in lines] == list(range(1, manifest["steps"] + 1))
        assert lines[-1]["loss"] == manifest["final_loss"]
    summary = data.eval_summary()
    assert set(summary["models"]) == {"stage1", "stage2"}
    assert len(data.eval_scores()) == sum(stats["images"] for stats in summary["models"].values())


def test_long_training_curves_are_thinned_to_evenly_spaced_steps():
    lines = [{"step": step, "loss": 1 / step} for step in range(1, 10 * CURVE_POINTS + 4)]
    (trace,) = training_figure({"stage1": lines}, "loss").data
    steps = list(trace.x)
    assert len(steps) <= CURVE_POINTS and steps[0] == 1 and steps[-1] == len(lines)
    assert len({later - earlier for earlier, later in zip(steps[:-2], steps[1:-1], strict=True)}) == 1
    assert list(trace.y) == [1 / step for step in steps]


def test_snapshot_is_one_self_contained_file_with_the_funnel_numbers(run_dir, data, snapshot):
    elements = Elements(snapshot)
    scripts = [attributes for tag, attributes in elements.found if tag == "script"]
    assert scripts and all("src" not in attributes for attributes in scripts)
    assert not [attributes for tag, attributes in elements.found if tag == "link"]
    images = [attributes["src"] for tag, attributes in elements.found if tag == "img"]
    assert images and all(source.startswith("data:image/jpeg;base64,") for source in images)
    assert "plotly.js v" in snapshot  # the library itself, inline
    assert funnel_table(snapshot) == data.funnel()
    chart_ids = {
        attributes["id"]
        for attributes in elements.with_attribute("div", "id")
        if attributes["id"].startswith("chart-")
    }
    assert {
        "chart-funnel",
        "chart-funnel-datasets",
        "chart-hist-filter-face_size",
        "chart-hist-filter-sharpness",
        "chart-hist-spms-identity_similarity",
        "chart-caption-sources",
        "chart-caption-lengths",
        "chart-buckets",
        "chart-training-loss",
        "chart-eval-means",
    } <= chart_ids
    tiles = elements.with_attribute("figure", "data-key")
    funnel = data.funnel()
    for step in data.image_steps():
        for outcome, count in funnel[step].items():
            shown = [tile for tile in tiles if tile["data-step"] == step and tile["data-outcome"] == outcome]
            assert len(shown) == min(count, THUMBNAILS_PER_OUTCOME), (step, outcome)
    assert "No eval report" not in snapshot and "missing-steps" not in snapshot


def test_partial_run_renders_what_is_there_and_names_what_is_missing(run_dir, tmp_path):
    partial = tmp_path / "partial"
    partial.mkdir()
    for step in ("ingest", "filter"):
        (partial / step).symlink_to(run_dir / step)
    (partial / "caption").mkdir()  # a step that started and committed nothing yet
    (partial / "caption" / "_manifest.json").write_text('{"status": "running", "step": "caption"}')
    page = write_snapshot(partial).read_text()
    data = RunData(partial)
    assert (
        funnel_table(page)
        == data.funnel()
        == {step: DatasetIndex(run_dir / step).reason_counts() for step in ("ingest", "filter")}
    )
    statuses = {
        row["data-step"]: row["data-status"] for row in Elements(page).with_attribute("tr", "data-status")
    }
    assert statuses["caption"] == "running" and statuses["filter"] == "complete"
    assert {step for step, status in statuses.items() if status == "missing"} == set(data.missing_steps())
    assert f"no output of {', '.join(data.missing_steps())}:" in page
    assert "No caption output" in page and "No eval report" in page and "No training step" in page
    assert 'id="chart-hist-filter-face_size"' in page and 'id="chart-caption-sources"' not in page


def test_the_dashboard_command_writes_the_snapshot_and_refuses_a_missing_folder(run_dir, tmp_path):
    from typer.testing import CliRunner

    from flows.cli import app

    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "ingest").symlink_to(run_dir / "ingest")
    result = CliRunner().invoke(app, ["dashboard", str(partial), "--snapshot"])
    assert result.exit_code == 0 and f"wrote {partial / 'dashboard' / 'index.html'}" in result.output
    assert funnel_table((partial / "dashboard" / "index.html").read_text()) == {
        "ingest": DatasetIndex(run_dir / "ingest").reason_counts()
    }
    missing = CliRunner().invoke(app, ["dashboard", str(tmp_path / "nope")])
    assert missing.exit_code == 2 and "is not a folder" in missing.output


def test_empty_run_folder_renders(tmp_path):
    page = write_snapshot(tmp_path).read_text()
    assert "No step of this run has committed rows yet." in page and funnel_table(page) == {}


def test_app_filters_thumbnails_by_step_reason_and_dataset(run_dir, data, client):
    for step in data.image_steps():
        for outcome, count in data.outcomes(step).items():
            params = {"step": step, "reason": outcome, "page_size": MAX_PAGE_SIZE}
            found = client.get("/api/thumbnails", params=params).json()
            assert found["total"] == count and len(found["items"]) == min(count, MAX_PAGE_SIZE)
            assert {item["outcome"] for item in found["items"]} == {outcome}, (step, outcome)
            if step in SAMPLE_STEPS:
                rows = DatasetIndex(run_dir / step).query(
                    "SELECT key FROM samples WHERE coalesce(reject_reason, status) = $outcome ORDER BY key",
                    outcome=outcome,
                )
                assert [item["key"] for item in found["items"]] == [row["key"] for row in rows]
    dataset = data.datasets()[0]
    in_dataset = client.get("/api/thumbnails", params={"step": "filter", "dataset": dataset}).json()
    assert in_dataset["total"] == sum(data.funnel(dataset)["filter"].values())
    assert {item["dataset"] for item in in_dataset["items"]} == {dataset}
    nothing = client.get("/api/thumbnails", params={"step": "filter", "dataset": "no such dataset"}).json()
    assert (nothing["total"], nothing["items"]) == (0, [])
    reason = next(outcome for outcome in data.outcomes("filter") if outcome != OK)
    page = client.get("/", params={"step": "filter", "reason": reason, "dataset": dataset}).text
    tiles = Elements(page).with_attribute("figure", "data-key")
    assert {tile["data-outcome"] for tile in tiles} == {reason}
    assert len(tiles) == data.funnel(dataset)["filter"][reason]
    assert funnel_table(page) == data.funnel(dataset)
    fragment = client.get("/thumbnails", params={"step": "filter", "reason": reason}).text
    assert fragment.startswith('<section id="thumbnails">') and "<html" not in fragment
    assert Elements(fragment).with_attribute("figure", "data-key") == tiles
    assert client.get("/api/thumbnails", params={"step": "caption"}).status_code == 404


def test_app_pages_through_every_row_of_a_step(run_dir, data, client):
    total, size = sum(data.outcomes("filter").values()), 5
    keys, pages = [], math.ceil(total / size)
    for page in range(1, pages + 1):
        params = {"step": "filter", "page": page, "page_size": size}
        found = client.get("/api/thumbnails", params=params).json()
        assert (found["total"], found["pages"]) == (total, pages)
        assert len(found["items"]) == (size if page < pages else total - size * (pages - 1))
        keys += [item["key"] for item in found["items"]]
    index = DatasetIndex(run_dir / "filter")
    assert sorted(keys) == sorted(row["key"] for row in index.table(["key"]).to_pylist())
    kept = index.query("SELECT key FROM samples WHERE status = 'ok' ORDER BY key")
    assert keys[: len(kept)] == [row["key"] for row in kept]  # kept first, then by reason and key
    second = Elements(client.get("/", params={"step": "filter", "page": 2, "page_size": size}).text)
    tiles = second.with_attribute("figure", "data-key")
    assert [tile["data-key"] for tile in tiles] == keys[size : 2 * size]
    links = {link.get("id"): link["href"] for link in second.with_attribute("a", "href")}
    assert "page=1" in links["previous-page"] and "page=3" in links["next-page"]
    assert f"page_size={size}" in links["next-page"]


def test_app_serves_images_and_plotly_locally(run_dir, data, client):
    kept = data.thumbnails("filter", OK, limit=1).items[0]
    response = client.get(f"/thumbnail/filter/{kept.key}.jpg")
    assert response.headers["content-type"] == "image/jpeg"
    with Image.open(io.BytesIO(response.content)) as image:
        assert max(image.size) == THUMBNAIL_SIDE
    rejected_at_ingest = {
        row["key"]
        for row in DatasetIndex(run_dir / "ingest").query("SELECT key FROM samples WHERE status <> 'ok'")
    }
    rejected = [item for item in data.thumbnails("filter", limit=1000).items if item.outcome != OK]
    # rejected by ingest: no tar holds its bytes; by the filter: the image is in the ingest shard tar
    for item in rejected:
        expected = 404 if item.key in rejected_at_ingest else 200
        assert client.get(f"/thumbnail/filter/{item.key}.jpg").status_code == expected, item
    assert {item.key in rejected_at_ingest for item in rejected} == {True, False}
    script = client.get("/plotly.min.js")
    assert script.content == package_file("plotly", "package_data", "plotly.min.js").read_bytes()
    page = client.get("/").text
    sources = [
        attributes["src"]
        for tag, attributes in Elements(page).found
        if tag == "script" and "src" in attributes
    ]
    assert sources == ["/plotly.min.js"]
