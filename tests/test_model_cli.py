"""``infu generate``: a PNG from a real photo on CPU; clean errors that name the offending input."""

from __future__ import annotations

import os
import time

import numpy as np
import pytest
import typer
import yaml
from PIL import Image
from typer.testing import CliRunner

from infu.model.cli import generate_command

from .conftest import INFINITE_ID_EMBEDDED

pytestmark = pytest.mark.filterwarnings("ignore:.*FluxPosEmbed:FutureWarning")

EMBEDDED_MODEL = {
    "variant": "tiny",
    "tiny_seed": 0,
    "infusenet_factor": 4,
    "projection": {
        "dim": 64,
        "depth": 1,
        "dim_head": 16,
        "heads": 4,
        "num_queries": 8,
        "embedding_dim": 128,
        "output_dim": 32,
        "ff_mult": 2,
    },
    "inference": {"width": 96, "height": 128, "num_steps": 4, "max_sequence_length": 32},
}


@pytest.fixture(scope="module")
def astronaut() -> str:
    skimage_data = pytest.importorskip("skimage.data")
    return os.path.join(os.path.dirname(skimage_data.__file__), "astronaut.png")


@pytest.fixture
def pose_photo(astronaut, tmp_path):
    """The astronaut's face, cropped so that dlib still finds it once resized and padded to 64 x 64."""
    path = tmp_path / "pose.png"
    Image.open(astronaut).convert("RGB").crop((130, 30, 310, 210)).save(path)
    return str(path)


@pytest.fixture
def config_file(tmp_path):
    path = tmp_path / "embedded.yaml"
    path.write_text(yaml.safe_dump({"face": {"backend": "dlib"}, "model": EMBEDDED_MODEL}))
    return path


@pytest.fixture
def blank(tmp_path):
    path = tmp_path / "blank.png"
    Image.new("RGB", (160, 160), (90, 140, 200)).save(path)
    return path


def invoke(args: list[str]):
    """Run the command as `infu generate` would, on a wide terminal so messages are not wrapped."""
    return CliRunner().invoke(cli(), args, env={"COLUMNS": "400", "TERMINAL_WIDTH": "400"})


def cli() -> typer.Typer:
    app = typer.Typer()
    app.callback()(lambda: None)
    app.command("generate")(generate_command)
    return app


def test_generate_writes_a_png_on_cpu_quickly(astronaut, config_file, tmp_path):
    out = tmp_path / "portrait.png"
    started = time.perf_counter()
    generate_command(
        id_image=[astronaut], prompt="an astronaut on the moon", out=out, config=config_file, seed=1, steps=2
    )
    elapsed = time.perf_counter() - started
    print(f"\ninfu generate (embedded, 96x128, 2 steps): {elapsed:.1f}s")
    assert elapsed < 60
    with Image.open(out) as image:
        assert image.format == "PNG" and image.size == (96, 128)


def test_cli_with_mixing_pose_and_size_overrides(astronaut, pose_photo, config_file, tmp_path):
    out = tmp_path / "mixed.png"
    args = [
        "generate",
        "--id-image",
        astronaut,
        "--id-image",
        astronaut,
        "--id-weight",
        "1",
        "--id-weight",
        "3",
    ]
    args += ["--prompt", "a portrait", "--control-image", pose_photo, "--config", str(config_file)]
    args += ["--out", str(out), "--steps", "1", "--width", "64", "--height", "64"]
    result = invoke(args)
    assert result.exit_code == 0, result.output
    assert "wrote" in result.output
    with Image.open(out) as image:
        assert image.size == (64, 64)


def test_no_face_is_a_clean_error_naming_the_file(astronaut, blank, config_file, tmp_path):
    with pytest.raises(typer.BadParameter, match="blank.png"):
        generate_command(id_image=[blank], prompt="x", out=tmp_path / "x.png", config=config_file)
    base = ["generate", "--prompt", "x", "--config", str(config_file), "--out", str(tmp_path / "x.png")]
    result = invoke([*base, "--id-image", str(blank)])
    assert result.exit_code == 2
    assert (
        "no face found in" in result.output and "blank.png" in result.output and "--id-image" in result.output
    )
    assert "Traceback" not in result.output
    result = invoke([*base, "--id-image", astronaut, "--control-image", str(blank)])
    assert result.exit_code == 2 and "--control-image" in result.output and "blank.png" in result.output
    assert not (tmp_path / "x.png").exists()


def test_bad_inputs_exit_2(astronaut, config_file, tmp_path):
    base = ["generate", "--prompt", "x", "--id-image", astronaut, "--out", str(tmp_path / "x.png")]
    not_image = tmp_path / "notes.png"
    not_image.write_text("not an image")
    cases = [
        ([*base, "--config", str(config_file), "--id-weight", "1", "--id-weight", "2"], "--id-weight"),
        ([*base, "--config", str(config_file), "--width", "72"], "multiple of 16"),
        ([*base, "--config", str(tmp_path / "missing.yaml")], "cannot read config"),
        ([*base, "--config", str(config_file), "--id-image", str(not_image)], "notes.png"),
    ]
    for args, message in cases:
        result = invoke(args)
        assert result.exit_code == 2, result.output
        assert message in result.output


def test_sizes_and_out_are_checked_before_generating(astronaut, config_file, tmp_path, monkeypatch):
    def must_not_run(*args, **kwargs):
        raise AssertionError("generate() ran although the request is invalid")

    monkeypatch.setattr("infu.model.cli.generate", must_not_run)
    base = ["generate", "--prompt", "x", "--id-image", astronaut, "--config", str(config_file)]
    out = ["--out", str(tmp_path / "x.png")]
    big_config = tmp_path / "big.yaml"
    big = {**EMBEDDED_MODEL, "inference": {**EMBEDDED_MODEL["inference"], "width": 8192}}
    big_config.write_text(yaml.safe_dump({"face": {"backend": "dlib"}, "model": big}))
    cases = [
        ([*base, *out, "--width", "65536", "--height", "65536"], "--width/--height", "must be at most 4096"),
        ([*base, *out, "--height", "4112"], "--width/--height", "96x4112"),
        ([*base, *out, "--config", str(big_config)], "--width/--height", "8192x128"),
        ([*base, "--out", str(tmp_path)], "--out", "is a folder"),
        ([*base, "--out", str(tmp_path / "missing" / "x.png")], "--out", "does not exist"),
    ]
    for args, hint, message in cases:
        result = invoke(args)
        assert result.exit_code == 2, result.output
        assert hint in result.output and message in result.output and "Traceback" not in result.output
    assert not (tmp_path / "x.png").exists()


def test_infinite_id_generates_from_its_config_and_refuses_a_pose_control(astronaut, pose_photo, tmp_path):
    out = tmp_path / "infinite-id.png"
    base = ["generate", "--id-image", astronaut, "--prompt", "a portrait, oil painting"]
    result = invoke([*base, "--config", str(INFINITE_ID_EMBEDDED), "--out", str(out), "--steps", "2"])
    assert result.exit_code == 0, result.output
    with Image.open(out) as image:
        assert image.format == "PNG" and image.size == (96, 128)
        pixels = np.asarray(image)
    again = tmp_path / "again.png"
    assert (
        invoke([*base, "--config", str(INFINITE_ID_EMBEDDED), "--out", str(again), "--steps", "2"]).exit_code
        == 0
    )
    assert np.array_equal(np.asarray(Image.open(again)), pixels), "a seed gives the same image"
    refused = invoke(
        [
            *base,
            "--config",
            str(INFINITE_ID_EMBEDDED),
            "--out",
            str(tmp_path / "x.png"),
            "--control-image",
            pose_photo,
        ]
    )
    assert refused.exit_code == 2 and "takes no pose control" in refused.output


def test_model_family_settings_are_checked(tmp_path):
    from infu.model.config import ModelConfig
    from infu.model.factory import build_encoders, build_pipeline

    with pytest.raises(ValueError, match="variant full needs infinite_id.open_clip"):
        ModelConfig(family="infinite_id", variant="full", base_model=str(tmp_path))
    with pytest.raises(ValueError, match="infu_model: InfU settings, not used by family infinite_id"):
        ModelConfig(family="infinite_id", infu_model=tmp_path)
    with pytest.raises(ValueError, match="use mode mixed or mutual"):
        ModelConfig(family="infinite_id", infinite_id={"mode": "plain", "adain": "mean"})
    infinite_id = ModelConfig(family="infinite_id")
    for build in (build_pipeline, build_encoders):
        with pytest.raises(ValueError, match="model.family infinite_id: this builds InfU on FLUX"):
            build(infinite_id)
