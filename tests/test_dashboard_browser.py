"""The dashboard in a real browser (headless Debian Chromium through Playwright): the snapshot from
``file://`` and the served dashboard render every chart, show the Parquet counts, and filter and page
through thumbnails."""

from __future__ import annotations

import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import uvicorn

from flows.dashboard import create_app, write_snapshot
from flows.dashboard.data import OK
from infu.index import DatasetIndex
from infu.raycluster import free_port

SAMPLE_STEPS = ("ingest", "filter", "synth", "spms")
PAGE_SIZE = 5
"""Thumbnails per page in the served test (the filter's rows of the sample corpus take several pages)."""
CHART_TIMEOUT_MS = 30_000
RENDERED = """() => {
    const charts = [...document.querySelectorAll('.plotly-graph-div')];
    return charts.length > 0 && charts.every(chart => chart.querySelector('.main-svg'));
}"""
FUNNEL = """() => [...document.querySelectorAll('#funnel-table tr[data-outcome]')].map(
    row => [row.dataset.step, row.dataset.outcome, Number(row.dataset.count), row.innerText])"""
TILES = """() => [...document.querySelectorAll('#thumbnail-grid figure.thumb')].map(tile => ({
    key: tile.dataset.key, step: tile.dataset.step, outcome: tile.dataset.outcome,
    loaded: tile.querySelector('img') ? tile.querySelector('img').naturalWidth > 0 : null}))"""


@pytest.fixture(scope="module")
def browser() -> Iterator:
    """Headless Debian Chromium (never a downloaded one)."""
    executable = shutil.which("chromium")
    if executable is None:
        pytest.skip("no chromium on PATH: the Debian package `chromium` runs the browser tests")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, args=["--no-sandbox"])
        yield browser
        browser.close()


@pytest.fixture
def page_errors() -> list[str]:
    """The script errors of the test's page."""
    return []


@pytest.fixture
def page(browser, page_errors):
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    page = context.new_page()
    page.on("pageerror", lambda error: page_errors.append(str(error)))
    yield page
    context.close()


@pytest.fixture(scope="module")
def server_url(pipeline_run) -> Iterator[str]:
    """The served dashboard of the run, on a free loopback port, in a thread of this process."""
    port = free_port()
    config = uvicorn.Config(
        create_app(pipeline_run.run_dir), host="127.0.0.1", port=port, log_level="warning"
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.started, "the dashboard server did not start"
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=10)


def chart_ids(page) -> list[str]:
    """Every chart's id, once plotly has drawn every one of them."""
    page.wait_for_function(RENDERED, timeout=CHART_TIMEOUT_MS)
    return page.eval_on_selector_all(".js-plotly-plot", "charts => charts.map(chart => chart.id)")


def shown_funnel(page) -> dict[str, dict[str, int]]:
    """The funnel table as shown: the counts its cells display, which equal its data attributes."""
    funnel: dict[str, dict[str, int]] = {}
    for step, outcome, count, text in page.evaluate(FUNNEL):
        assert text.split("\t")[:3] == [step, outcome, str(count)]
        funnel.setdefault(step, {})[outcome] = count
    return funnel


def shown_thumbnails(page, grid: dict[str, str]) -> list[dict]:
    """The thumbnail tiles, once the grid's ``data-`` attributes say ``grid`` (the section is fetched
    anew on each choice) and their images are loaded."""
    selector = "#thumbnail-grid" + "".join(f'[data-{name}="{value}"]' for name, value in grid.items())
    page.wait_for_selector(selector, timeout=CHART_TIMEOUT_MS)
    page.wait_for_load_state("networkidle")
    return page.evaluate(TILES)


def save_screenshot(page, run_dir: Path, tmp_path: Path, name: str) -> None:
    page.screenshot(path=str(tmp_path / name), full_page=True)
    folder = run_dir / "dashboard" / "screenshots"
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(tmp_path / name, folder / name)


def test_snapshot_renders_from_file_without_network(pipeline_run, page, page_errors, tmp_path):
    run_dir = Path(pipeline_run.run_dir)
    snapshot = write_snapshot(run_dir)
    requests = []
    page.on("request", lambda request: requests.append(request.url))
    page.goto(snapshot.resolve().as_uri())
    ids = chart_ids(page)
    assert {"chart-funnel", "chart-funnel-datasets", "chart-hist-filter-face_size", "chart-buckets"} <= set(
        ids
    )
    assert {"chart-hist-spms-identity_similarity", "chart-training-loss", "chart-eval-means"} <= set(ids)
    for chart_id in ids:
        assert page.locator(f"#{chart_id} .main-svg").count() >= 1, chart_id
    funnel = shown_funnel(page)
    for step in SAMPLE_STEPS:
        assert funnel[step] == DatasetIndex(run_dir / step).reason_counts(), step
    images = page.eval_on_selector_all(
        "figure.thumb img", "images => images.map(image => image.naturalWidth)"
    )
    assert images and all(width > 0 for width in images)
    assert all(url.startswith(("file://", "data:")) for url in requests), requests
    assert page_errors == []
    save_screenshot(page, run_dir, tmp_path, "snapshot.png")


def test_served_dashboard_filters_and_pages_thumbnails(pipeline_run, server_url, page, page_errors, tmp_path):
    run_dir = Path(pipeline_run.run_dir)
    page.goto(f"{server_url}/?page_size={PAGE_SIZE}")
    ids = chart_ids(page)
    assert {"chart-funnel", "chart-hist-filter-sharpness", "chart-caption-sources"} <= set(ids)
    funnel = shown_funnel(page)
    for step in SAMPLE_STEPS:
        assert funnel[step] == DatasetIndex(run_dir / step).reason_counts(), step

    # a reason of the filter's own: those rows have images (in the ingest shard tars)
    reason = next(outcome for outcome in funnel["filter"] if outcome not in funnel["ingest"])
    page.select_option("#filter-reason", reason)
    tiles = shown_thumbnails(page, {"step": "filter", "reason": reason})
    expected = DatasetIndex(run_dir / "filter").query(
        "SELECT key FROM samples WHERE reject_reason = $reason ORDER BY key LIMIT $limit",
        reason=reason,
        limit=PAGE_SIZE,
    )
    assert [tile["key"] for tile in tiles] == [row["key"] for row in expected]
    assert {tile["outcome"] for tile in tiles} == {reason} and all(tile["loaded"] for tile in tiles)
    assert page.locator("#thumbnail-grid").get_attribute("data-total") == str(funnel["filter"][reason])
    assert f"reason={reason}" in page.url
    save_screenshot(page, run_dir, tmp_path, f"served-filter-{reason}.png")

    page.select_option("#filter-reason", OK)
    kept = shown_thumbnails(page, {"step": "filter", "reason": OK})
    assert len(kept) == min(PAGE_SIZE, funnel["filter"][OK])
    assert {tile["outcome"] for tile in kept} == {OK} and all(tile["loaded"] for tile in kept)

    page.select_option("#filter-reason", "")
    keys = [tile["key"] for tile in shown_thumbnails(page, {"step": "filter", "reason": "", "page": "1"})]
    pages = int(page.locator("#thumbnail-grid").get_attribute("data-pages"))
    for number in range(2, pages + 1):
        page.click("#next-page")
        keys += [tile["key"] for tile in shown_thumbnails(page, {"step": "filter", "page": str(number)})]
    assert page.locator("#next-page").count() == 0
    all_keys = [row["key"] for row in DatasetIndex(run_dir / "filter").table(["key"]).to_pylist()]
    assert pages == -(-len(all_keys) // PAGE_SIZE) > 1 and sorted(keys) == sorted(all_keys)

    page.select_option("#filter-step", "spms")
    synthetic = shown_thumbnails(page, {"step": "spms", "reason": "", "page": "1"})
    assert {tile["step"] for tile in synthetic} == {"spms"}
    assert len(synthetic) == min(PAGE_SIZE, sum(funnel["spms"].values()))
    assert page_errors == []
    save_screenshot(page, run_dir, tmp_path, "served-spms.png")
