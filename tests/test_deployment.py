"""`prefect deployment run full-pipeline/embedded` on a real Prefect server and process worker: the run's
final state and artifacts through the API, and every step's output."""

from __future__ import annotations

import json

import pytest

from infu.manifest import read_manifest
from infu.progress import latest_progress
from infu.steps import pipeline_order

from .conftest import pipeline_overrides
from .test_flow import (
    assert_captioned,
    assert_evaluated,
    assert_filtered,
    assert_ingested,
    assert_paired,
    assert_trained,
)


@pytest.fixture(scope="module")
def deployed(pipeline_run):
    if pipeline_run.server is None:
        pytest.skip("INFU_PIPELINE_RUN reuses a run folder: there is no deployment run to inspect")
    return pipeline_run


def test_the_deployment_run_completes_every_step_as_a_ray_job(deployed):
    server, run_dir = deployed.server, deployed.run_dir
    assert "Flow run finished successfully in 'Completed'" in deployed.output
    assert server.get(f"/flow_runs/{deployed.flow_run_id}")["state"]["type"] == "COMPLETED"
    task_runs = server.post("/task_runs/filter", {"flow_runs": {"id": {"any_": [deployed.flow_run_id]}}})
    assert {run["name"]: run["state"]["type"] for run in task_runs} == {
        **dict.fromkeys(pipeline_order(), "COMPLETED"),
        "dashboard": "COMPLETED",
    }
    assert sorted(path.name.split("-")[0] for path in (run_dir / "_configs").iterdir()) == sorted(
        pipeline_order()
    )
    assert_ingested(run_dir)
    assert_filtered(run_dir)
    assert_captioned(run_dir)
    assert_trained(run_dir, steps=4)
    metrics = (run_dir / "stage1" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["cached_share"] for line in metrics] == [1.0] * 4, "stage 1 read the cache"
    assert_paired(run_dir)
    assert_evaluated(run_dir)


def test_every_step_has_its_table_and_progress_artifacts_and_the_run_links_its_dashboard(deployed):
    artifacts = deployed.server.post(
        "/artifacts/filter", {"artifacts": {"flow_run_id": {"any_": [deployed.flow_run_id]}}}
    )
    # The newest of a key: a retried step has a progress artifact per attempt.
    by_key = {artifact["key"]: artifact for artifact in sorted(artifacts, key=lambda found: found["created"])}
    for step in pipeline_order():
        manifest = read_manifest(deployed.run_dir / step)
        table = {row["measure"]: row["value"] for row in json.loads(by_key[f"embedded-{step}"]["data"])}
        assert table["job"] == "ran"
        assert table["output"] == str(deployed.run_dir / step)
        assert table["seconds"] == manifest["timings"]["seconds"]
        counts = manifest.get("counts") or {}
        for name in ("samples", "ok", "rejected"):
            assert table.get(name) == counts.get(name), (step, name)
        assert {
            measure.removeprefix("rejected: "): value
            for measure, value in table.items()
            if measure.startswith("rejected: ")
        } == counts.get("reasons", {})
        assert table.get("steps") == manifest.get("steps"), step  # training steps
        progress = by_key[f"embedded-{step}-progress"]
        assert progress["type"] == "progress" and float(progress["data"]) == 100.0, step
        record = latest_progress(deployed.run_dir / step)  # what the job wrote, shards or training steps
        assert record["done"] == record["total"] > 0, step
        assert (
            progress["description"]
            == f"{record['label']}: {record['done']}/{record['total']} {record['unit']}"
        )
    link = by_key["embedded-dashboard"]
    assert link["type"] == "markdown"  # Prefect stores a link as its markdown
    dashboard = deployed.run_dir / "dashboard" / "index.html"
    assert dashboard.resolve().as_uri() in link["data"] and dashboard.stat().st_size > 0


def test_each_step_has_a_deployment_of_its_own_that_runs_it_alone(deployed):
    """`prefect deployment run eval/embedded` on the finished run: the eval step's flow skips its job."""
    flow_run_id, output = deployed.server.run_deployment(
        "eval/embedded", overrides=pipeline_overrides(deployed.run_dir)
    )
    assert "Flow run finished successfully in 'Completed'" in output
    (artifact,) = deployed.server.post(
        "/artifacts/filter",
        {"artifacts": {"flow_run_id": {"any_": [flow_run_id]}, "key": {"any_": ["embedded-eval"]}}},
    )
    assert json.loads(artifact["data"])[0] == {"measure": "job", "value": "skipped (output complete)"}
    task_runs = deployed.server.post("/task_runs/filter", {"flow_runs": {"id": {"any_": [flow_run_id]}}})
    assert sorted(run["name"] for run in task_runs) == ["dashboard", "eval"]
    deployments = deployed.server.post("/deployments/filter", {})
    names = {(deployment["entrypoint"].rsplit(":", 1)[1], deployment["name"]) for deployment in deployments}
    for step in pipeline_order():
        assert {(f"{step}_flow", "embedded"), (f"{step}_flow", "flux-dev")} <= names
