"""Run config: both profiles load, errors name the key and value, hashes identify step outputs."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest

from infu.config import ConfigError, config_from_dict, load_config

from .conftest import PROJECT_ROOT

CONFIGS = PROJECT_ROOT / "configs"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return path


def test_shipped_profiles_load_with_paper_settings():
    embedded = load_config(CONFIGS / "embedded.yaml")
    assert embedded.run.profile == "embedded"
    assert embedded.face.backend == "dlib"
    assert embedded.model.variant == "tiny"
    assert embedded.ingest is not None and embedded.ingest.source.kind == "sample_corpus"

    paper = load_config(CONFIGS / "flux-dev.yaml")
    assert paper.run.profile == "production"
    assert paper.face.backend == "insightface" and paper.face.pack_name == "antelopev2"
    assert paper.model.variant == "full" and paper.model.infusenet_factor == 4
    assert paper.model.projection.num_queries == 8 and paper.model.projection.embedding_dim == 512
    assert paper.filter.resources.stages["decode"].num_gpus is None
    assert paper.filter.resources.stages["decode"].concurrency == 128


def test_unknown_key_is_rejected_by_name(tmp_path):
    path = write(tmp_path, "ingest:\n  source: {kind: folder, path: x, dataset: d}\n  shard_sise: 10\n")
    with pytest.raises(ConfigError) as error:
        load_config(path)
    assert "ingest.shard_sise: unknown key (value 10)" in str(error.value)


def test_bad_value_names_key_and_value(tmp_path):
    path = write(tmp_path, "ingest:\n  source: {kind: ftp, path: x, dataset: d}\n  shard_size: -3\n")
    with pytest.raises(ConfigError) as error:
        load_config(path)
    message = str(error.value)
    assert "ingest.source.kind" in message and "'ftp'" in message
    assert "ingest.shard_size" in message and "-3" in message


@pytest.mark.parametrize(
    ("text", "expected"),
    [("- a\n- b\n", "must be a mapping"), ("run: [unclosed\n", "not valid YAML")],
)
def test_malformed_files(tmp_path, text, expected):
    with pytest.raises(ConfigError, match=expected):
        load_config(write(tmp_path, text))


def test_missing_file_and_missing_section(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(tmp_path / "absent.yaml")
    with pytest.raises(ConfigError, match="no `ingest:` section"):
        config_from_dict({}).step("ingest")


def test_overrides_are_typed_and_validated(tmp_path):
    config = load_config(CONFIGS / "embedded.yaml", ["ingest.shard_size=3", f"run.run_dir={tmp_path}"])
    assert config.ingest.shard_size == 3
    assert config.run.run_dir == tmp_path
    with pytest.raises(ConfigError, match="ingest.shard_size"):
        load_config(CONFIGS / "embedded.yaml", ["ingest.shard_size=zero"])
    with pytest.raises(ConfigError, match="not of the form"):
        load_config(CONFIGS / "embedded.yaml", ["shard_size"])


def test_relative_paths_resolve_against_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = load_config(CONFIGS / "embedded.yaml", ["filter.held_out_identities=people"])
    assert config.run.run_dir == tmp_path / "runs" / "embedded"
    assert config.ingest.source.path == tmp_path / "runs" / "embedded" / "sample_corpus"
    assert config.filter.held_out_identities == tmp_path / "people"


def test_paths_inside_the_run_folder_move_with_it(tmp_path):
    moved = load_config(CONFIGS / "embedded.yaml", [f"run.run_dir={tmp_path / 'run'}"])
    assert moved.ingest.source.path == tmp_path / "run" / "sample_corpus"
    assert moved.face == load_config(CONFIGS / "embedded.yaml").face
    pinned = load_config(
        CONFIGS / "embedded.yaml",
        [f"run.run_dir={tmp_path / 'run'}", f"ingest.source.path={tmp_path / 'corpus'}"],
    )
    assert pinned.ingest.source.path == tmp_path / "corpus"
    inside = load_config(CONFIGS / "embedded.yaml", ["run.run_dir=runs/embedded/inner"])
    assert inside.run.run_dir == Path.cwd() / "runs" / "embedded" / "inner"
    assert inside.ingest.source.path == inside.run.run_dir / "sample_corpus"


def test_identities_do_not_depend_on_the_working_directory(tmp_path, monkeypatch):
    from_root = load_config(CONFIGS / "embedded.yaml")
    monkeypatch.chdir(tmp_path)
    elsewhere = load_config(CONFIGS / "embedded.yaml")
    assert elsewhere.ingest.source.path != from_root.ingest.source.path
    for step in ("ingest", "filter", "caption", "stage1"):
        assert elsewhere.step_hash(step) == from_root.step_hash(step)


@pytest.mark.parametrize("value", ["[1", "{a: 1", "'open", "a: b: c"])
def test_an_override_that_is_not_yaml_names_its_key(value):
    with pytest.raises(ConfigError, match=r"override ingest\.shard_size: value .* is not valid YAML"):
        load_config(CONFIGS / "embedded.yaml", [f"ingest.shard_size={value}"])


def test_a_config_that_is_not_utf8_is_a_config_error(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_bytes(b"run:\n  name: caf\xe9\n")
    with pytest.raises(ConfigError, match=r"run\.yaml is not UTF-8 text \(byte 16"):
        load_config(path)


def test_credentials_are_redacted_in_dumps_and_errors():
    from infu.config import dump_config, redact_secrets

    secret = "http://admin:S3cr3t@127.0.0.1:8265"
    config = load_config(CONFIGS / "embedded.yaml", [f"run.ray_address={secret}"])
    assert config.run.ray_address == secret
    assert "S3cr3t" not in dump_config(config) and "http://admin:***@127.0.0.1:8265" in dump_config(config)
    assert redact_secrets("https://TOKEN@host/x http://h:1/a@b") == "https://***@host/x http://h:1/a@b"
    with pytest.raises(ConfigError) as error:
        load_config(CONFIGS / "embedded.yaml", [f"run.ray_adress={secret}"])
    assert "S3cr3t" not in str(error.value) and "admin:***@" in str(error.value)


def test_sections_come_from_the_step_registry(tmp_path):
    from filtering.config import FilterConfig, IngestConfig

    config = load_config(CONFIGS / "embedded.yaml")
    assert isinstance(config.step("ingest"), IngestConfig) and isinstance(config.step("filter"), FilterConfig)
    with pytest.raises(ConfigError, match=r"captioning: unknown section \(known: run, face, model, quality"):
        load_config(write(tmp_path, "captioning: {}\n"))


def test_step_hash_tracks_output_relevant_settings_only():
    base = load_config(CONFIGS / "embedded.yaml")
    same = load_config(CONFIGS / "embedded.yaml", ["ingest.resources.concurrency=7", "run.name=other"])
    changed = load_config(CONFIGS / "embedded.yaml", ["ingest.min_side=65"])
    assert len(base.step_hash("ingest")) == 64
    assert base.step_hash("ingest") == same.step_hash("ingest")
    assert base.step_hash("ingest") != changed.step_hash("ingest")


def test_a_loaded_config_pickles(tmp_path):
    config = load_config(CONFIGS / "embedded.yaml", [f"run.run_dir={tmp_path}"])
    assert pickle.loads(pickle.dumps(config)) == config


@pytest.mark.parametrize(
    "profile", sorted((PROJECT_ROOT / "configs").glob("*.yaml")), ids=lambda path: path.stem
)
def test_a_config_written_out_whole_reads_back_the_same(profile, tmp_path):
    """The flow hands each job the validated config written out whole (defaults included): reading it
    back must give the same config, so no setting may depend on whether a key was written."""
    from infu.config import dump_config

    config = load_config(profile, [f"run.run_dir={tmp_path / 'run'}"])
    written = tmp_path / "written.yaml"
    written.write_text(dump_config(config))
    assert load_config(written) == config
