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


def test_relative_paths_resolve_against_the_loading_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = load_config(CONFIGS / "embedded.yaml")
    assert config.run.run_dir == tmp_path / "runs" / "embedded"
    assert config.ingest.source.path == tmp_path / "runs" / "embedded" / "sample_corpus"


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
