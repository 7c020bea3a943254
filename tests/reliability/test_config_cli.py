"""Config and command-line reliability (issue 9, defects 9, 10, 11, 16), each from its reproduction.

Relative paths resolve against the working directory and identities do not depend on it; bad overrides
and files are config errors; step errors are one line with status 2 (config) or 1 (runtime); an
unreachable Ray fails fast; credentials never reach the files a run writes.
"""

from __future__ import annotations

import base64
import json
import re
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest
from typer.testing import CliRunner

from flows.cli import app as infu_app
from infu.config import load_config
from infu.steps import job_app, pipeline_order

from ..conftest import EMBEDDED, PROJECT_ROOT

SECRET_ADDRESS = "http://admin:S3cr3t@127.0.0.1:{port}"


def infu(*args: str):
    return CliRunner().invoke(infu_app, list(args))


def job(*args: str):
    """``python -m filtering <args>``, in this process."""
    return CliRunner().invoke(job_app("filtering"), list(args))


def assert_one_line_error(result, status: int, *expected: str) -> str:
    assert result.exit_code == status, result.output
    assert "Traceback" not in result.output
    message = result.stderr.strip()
    assert "\n" not in message, message
    for text in expected:
        assert text in message, message
    return message


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def identities(output: str) -> dict[str, str]:
    return dict(re.findall(r"^\s+(\w+): identity (\w+)$", output, flags=re.MULTILINE))


# 9: relative paths


def test_identities_are_equal_from_two_working_directories(tmp_path, monkeypatch):
    monkeypatch.chdir(PROJECT_ROOT)
    from_root = infu("config", "validate", str(EMBEDDED))
    monkeypatch.chdir(tmp_path)
    elsewhere = infu("config", "validate", str(EMBEDDED))
    assert from_root.exit_code == elsewhere.exit_code == 0, elsewhere.output
    assert f"run dir {tmp_path / 'runs' / 'embedded'}" in elsewhere.output
    steps = set(pipeline_order())
    assert set(identities(elsewhere.output)) == steps
    assert identities(elsewhere.output) == identities(from_root.output)


def test_the_sample_corpus_is_built_inside_the_run_folder(tmp_path, monkeypatch):
    from filtering.sources import open_source

    run_dir, cwd = tmp_path / "run", tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    config = load_config(EMBEDDED, [f"run.run_dir={run_dir}"])
    source = open_source(config.ingest.source)
    assert source.root == run_dir / "sample_corpus"
    assert (run_dir / "sample_corpus" / "labels.jsonl").is_file()
    assert list(cwd.iterdir()) == []
    assert config.step_hash("ingest") == load_config(EMBEDDED).step_hash("ingest")


def test_a_run_started_from_another_folder_is_the_same_run(tmp_path, monkeypatch):
    from infu.lineage import completed_manifest
    from infu.manifest import open_step_output

    overrides = [f"run.run_dir={tmp_path / 'run'}"]
    monkeypatch.chdir(PROJECT_ROOT)
    config = load_config(EMBEDDED, overrides)
    open_step_output(config, "ingest", config.ingest).complete()
    monkeypatch.chdir(tmp_path)
    assert completed_manifest(load_config(EMBEDDED, overrides), "ingest") is not None


# 10: overrides that are not YAML, files that are not UTF-8


def test_an_override_that_is_not_yaml_is_a_config_error():
    result = infu("config", "validate", str(EMBEDDED), "--set", "ingest.shard_size=[1")
    assert_one_line_error(result, 2, "override ingest.shard_size: value '[1' is not valid YAML")
    result = job("ingest", "--config", str(EMBEDDED), "--set", "ingest.shard_size=[1")
    assert_one_line_error(result, 2, "override ingest.shard_size")


def test_a_config_file_that_is_not_utf8_is_a_config_error(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("run:\n  name: café\n".encode("latin-1"))
    assert_one_line_error(infu("config", "validate", str(path)), 2, f"config {path} is not UTF-8 text")


# 11: step errors


def unwritable_folder(tmp_path: Path) -> Path:
    """A folder this process cannot create files in (a sysfs folder when running as root)."""
    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(0o555)
    for candidate in (folder, Path("/sys/kernel")):
        try:
            (candidate / "probe").touch()
        except OSError:
            return candidate
        (candidate / "probe").unlink()
    pytest.skip("every folder is writable here (root without sysfs)")


def test_a_run_dir_that_is_a_file(tmp_path):
    (tmp_path / "f").write_text("x")
    overrides = ["--set", "ingest.source.dataset=d", "--set", f"run.run_dir={tmp_path / 'f'}"]
    result = job("ingest", "--config", str(EMBEDDED), *overrides)
    assert_one_line_error(result, 2, f"ingest: run.run_dir {tmp_path / 'f'} is a file, not a folder")
    result = infu("ingest", "--config", str(EMBEDDED), *overrides)
    assert_one_line_error(result, 2, f"run.run_dir {tmp_path / 'f'} is a file")


def test_a_run_dir_that_is_not_writable(tmp_path):
    run_dir = unwritable_folder(tmp_path)
    result = job("ingest", "--config", str(EMBEDDED), "--set", f"run.run_dir={run_dir}")
    assert_one_line_error(result, 2, f"ingest: run.run_dir {run_dir} is not writable")


def test_a_missing_source_and_a_missing_section(tmp_path):
    overrides = ["--set", f"run.run_dir={tmp_path / 'run'}", "--set", "ingest.source.kind=folder"]
    overrides += ["--set", f"ingest.source.path={tmp_path / 'typo'}"]
    result = job("ingest", "--config", str(EMBEDDED), *overrides)
    assert_one_line_error(result, 2, f"ingest: source folder {tmp_path / 'typo'} does not exist")
    config = tmp_path / "no-filter.yaml"
    config.write_text(f"run: {{run_dir: {tmp_path / 'run'}}}\n")
    result = job("filter", "--config", str(config))
    assert_one_line_error(result, 2, "filter: this config has no `filter:` section")


def test_a_file_error_at_run_time_names_the_path(tmp_path):
    (tmp_path / "f").write_text("x")
    corpus = tmp_path / "f" / "corpus"
    overrides = ["--set", f"run.run_dir={tmp_path / 'run'}", "--set", f"ingest.source.path={corpus}"]
    result = job("ingest", "--config", str(EMBEDDED), *overrides)
    assert_one_line_error(result, 1, "ingest: Not a directory", str(corpus))


def test_an_unreachable_ray_address_fails_fast_without_its_secret(tmp_path):
    address = SECRET_ADDRESS.format(port=closed_port())
    overrides = ["--set", f"run.run_dir={tmp_path}", "--set", f"run.ray_address={address}"]
    started = time.monotonic()
    result = infu("ingest", "--config", str(EMBEDDED), *overrides)
    assert time.monotonic() - started < 10
    message = assert_one_line_error(result, 1, "ingest: no Ray dashboard at run.ray_address", "admin:***@")
    assert "S3cr3t" not in message


def test_an_unknown_step_fails_before_anything_starts(tmp_path):
    result = infu("run", "--config", str(EMBEDDED), "--set", f"run.run_dir={tmp_path}", "--step", "foo")
    assert_one_line_error(result, 2, "unknown step 'foo'; registered steps: ingest, filter")
    assert list(tmp_path.iterdir()) == []


# 16: credentials


class FakeDashboard(BaseHTTPRequestHandler):
    """Answers ``/api/version`` as Ray's dashboard does and records the Authorization header."""

    seen: list[str | None] = []

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        FakeDashboard.seen.append(self.headers.get("Authorization"))
        body = json.dumps({"version": "4", "ray_version": "2.60.0"}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def fake_dashboard():
    server = HTTPServer(("127.0.0.1", 0), FakeDashboard)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


def test_credentials_are_used_to_connect_but_never_written(tmp_path, fake_dashboard):
    from flows.steps import effective_config_file, ray_cluster
    from infu.manifest import open_step_output
    from infu.raycluster import probe_address

    address = SECRET_ADDRESS.format(port=fake_dashboard)
    config = load_config(EMBEDDED, [f"run.run_dir={tmp_path}", f"run.ray_address={address}"])
    probe_address(config.run.ray_address)
    assert FakeDashboard.seen[-1] == "Basic " + base64.b64encode(b"admin:S3cr3t").decode()
    with ray_cluster(config) as (connect_to, local):
        assert connect_to == address and not local

    open_step_output(config, "ingest", config.ingest).complete()
    effective_config_file(config, "ingest")
    written = [path for path in tmp_path.rglob("*") if path.is_file()]
    assert {path.name for path in written} >= {"_config.yaml", "_manifest.json"}
    assert [path for path in written if b"S3cr3t" in path.read_bytes()] == []
    assert (
        f"ray_address: http://admin:***@127.0.0.1:{fake_dashboard}"
        in (tmp_path / "ingest" / "_config.yaml").read_text()
    )


def test_environment_references_resolve_and_a_missing_one_names_its_key(monkeypatch):
    monkeypatch.setenv("INFU_TEST_ADDRESS", "http://admin:S3cr3t@127.0.0.1:8265")
    config = load_config(EMBEDDED, ["run.ray_address=${env:INFU_TEST_ADDRESS}"])
    assert config.run.ray_address == "http://admin:S3cr3t@127.0.0.1:8265"
    result = infu("config", "validate", str(EMBEDDED), "--set", "run.name=${env:INFU_TEST_UNSET}")
    assert_one_line_error(result, 2, "run.name", "INFU_TEST_UNSET", "is not set")


def test_credentials_never_become_flow_parameters(monkeypatch):
    """Prefect stores flow parameters: ``infu run`` moves credentials of ``--set`` into the environment,
    and the flow refuses parameters that still hold some."""
    from flows.full_pipeline import full_pipeline
    from infu.config import ConfigError, credentials_to_environment

    address = SECRET_ADDRESS.format(port=8265)
    overrides, environment = credentials_to_environment([f"run.ray_address={address}", "ingest.shard_size=4"])
    assert overrides == ["run.ray_address=${env:INFU_SECRET_RUN_RAY_ADDRESS}", "ingest.shard_size=4"]
    assert environment == {"INFU_SECRET_RUN_RAY_ADDRESS": address}
    monkeypatch.setenv("INFU_SECRET_RUN_RAY_ADDRESS", address)
    assert load_config(EMBEDDED, overrides).run.ray_address == address
    with pytest.raises(ConfigError, match=r"admin:\*\*\*@.*\$\{env:NAME\}") as error:
        full_pipeline.fn(str(EMBEDDED), [f"run.ray_address={address}"])
    assert "S3cr3t" not in str(error.value)
