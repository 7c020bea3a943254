"""QualityConfig: defaults per variant, weight paths required by ``full``, path resolution, no torch."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from infu.quality.config import QualityConfig


def test_tiny_defaults_need_no_weights_and_use_the_model_free_watermark_detector():
    config = QualityConfig()
    assert config.variant == "tiny"
    assert config.watermark_backend == "text_overlay"
    assert config.clip_model is None and config.aesthetic_head is None


def test_full_without_weights_names_every_missing_key():
    with pytest.raises(ValidationError) as error:
        QualityConfig(variant="full")
    message = str(error.value)
    for key in ("clip_model", "aesthetic_head", "nsfw_head", "watermark_model"):
        assert key in message


def test_full_names_only_the_missing_key(tmp_path: Path):
    with pytest.raises(ValidationError) as error:
        QualityConfig(variant="full", clip_model=tmp_path, aesthetic_head=tmp_path / "a.pth", nsfw_head=None)
    message = str(error.value)
    assert "nsfw_head" in message and "watermark_model" in message
    assert "aesthetic_head," not in message and "clip_model," not in message


def test_full_defaults_to_the_laion_watermark_model_and_text_overlay_drops_that_requirement(tmp_path: Path):
    heads = {"clip_model": tmp_path, "aesthetic_head": tmp_path / "a.pth", "nsfw_head": tmp_path / "n.pth"}
    laion = QualityConfig(variant="full", watermark_model=tmp_path / "w.pt", **heads)
    assert laion.watermark_backend == "laion"
    assert QualityConfig(variant="full", watermark_backend="text_overlay", **heads).watermark_model is None


def test_relative_paths_resolve_to_absolute_ones(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(tmp_path)
    config = QualityConfig(
        variant="full",
        clip_model="models/clip",
        aesthetic_head="heads/aesthetic.pth",
        nsfw_head="heads/nsfw.safetensors",
        watermark_backend="text_overlay",
    )
    assert config.clip_model == tmp_path.resolve() / "models" / "clip"
    assert config.aesthetic_head is not None and config.aesthetic_head.is_absolute()


def test_unknown_keys_bad_devices_and_mutation_are_rejected():
    with pytest.raises(ValidationError, match="clip_modle"):
        QualityConfig(clip_modle="x")
    with pytest.raises(ValidationError, match="device"):
        QualityConfig(device="gpu0")
    with pytest.raises(ValidationError, match="batch_size"):
        QualityConfig(batch_size=0)
    with pytest.raises(ValidationError):
        QualityConfig().variant = "full"  # type: ignore[misc]


def test_config_module_imports_without_torch():
    code = (
        "import sys, infu.quality, infu.quality.config; assert 'torch' not in sys.modules, 'torch imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
