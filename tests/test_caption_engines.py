"""The neural caption engines on tiny random-init models of the real classes (CPU, seconds), and the
LAVIS and lmdeploy adapters as far as they go without their runtime envs."""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image
from pydantic import ValidationError
from transformers import GitForCausalLM, GitProcessor

from captioning.config import Blip2Captioner, InternVL2Captioner, NeuralCaptioner, SmallCaptioner
from captioning.engines import engine_class, load_captioner, runtime_env_for
from captioning.engines.base import CACHE_ENV, TINY_REVISION, TransformersCaptioner
from captioning.engines.lavis_blip2 import Blip2LavisCaptioner, required_paths
from captioning.engines.lmdeploy_internvl2 import InternVL2LmdeployCaptioner
from captioning.engines.small import GitCaptioner
from infu.sample_corpus import portraits

LAVIS_SKIP = "LAVIS pins transformers<4.27: runs in its own Ray runtime env; not installable here"
LMDEPLOY_SKIP = "lmdeploy pins torch<=2.12.1: runs in its own Ray runtime env; not installable here"
LAVIS_INSTALLED = importlib.util.find_spec("lavis") is not None
LMDEPLOY_INSTALLED = importlib.util.find_spec("lmdeploy") is not None

# source, settings class, engine: every engine that runs in the main environment
RUNNABLE = [
    ("small", SmallCaptioner, "git"),
    ("small", SmallCaptioner, "blip"),
    ("blip2", Blip2Captioner, "transformers"),
    ("internvl2", InternVL2Captioner, "transformers"),
]
IDS = ["git", "blip", "blip2", "internvl2"]


@pytest.fixture(scope="module", autouse=True)
def tiny_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """One tiny-model cache for the module, never the developer's."""
    root = tmp_path_factory.mktemp("infu-cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(CACHE_ENV, str(root))
        yield root


@pytest.fixture(scope="module")
def images() -> list[Image.Image]:
    """Three real portraits of different sizes."""
    return portraits()[:3]


def settings_of(settings_class: type[NeuralCaptioner], engine: str, **fields: object) -> NeuralCaptioner:
    return settings_class.model_validate({"engine": engine, "max_new_tokens": 12, **fields})


def captions_of(source: str, settings: NeuralCaptioner, images: list[Image.Image]) -> list[str]:
    return load_captioner(source, settings).caption(images)


@pytest.mark.parametrize(("source", "settings_class", "engine"), RUNNABLE, ids=IDS)
def test_tiny_captions_one_string_per_image(
    source: str, settings_class: type[NeuralCaptioner], engine: str, images: list[Image.Image]
) -> None:
    captioner = load_captioner(source, settings_of(settings_class, engine))
    assert isinstance(captioner, engine_class(settings_of(settings_class, engine)))
    grey = images[0].convert("L")  # any mode is captioned as RGB
    captions = captioner.caption([*images, grey])
    assert len(captions) == 4
    assert all(caption and caption == caption.strip() for caption in captions)
    assert len(set(captions[:3])) > 1, "the tiny models are meant to caption different images differently"
    assert captioner.caption([]) == []


@pytest.mark.parametrize(("source", "settings_class", "engine"), RUNNABLE, ids=IDS)
def test_tiny_models_are_reproducible_from_their_seed(
    source: str,
    settings_class: type[NeuralCaptioner],
    engine: str,
    images: list[Image.Image],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    settings = settings_of(settings_class, engine)
    first = captions_of(source, settings, images)
    monkeypatch.setenv(CACHE_ENV, str(tmp_path))  # built and written again from the seed
    assert captions_of(source, settings, images) == first
    assert captions_of(source, settings_of(settings_class, engine, tiny_seed=1), images) != first


@pytest.mark.parametrize(("source", "settings_class", "engine"), RUNNABLE, ids=IDS)
def test_batch_size_does_not_change_captions(
    source: str, settings_class: type[NeuralCaptioner], engine: str, images: list[Image.Image]
) -> None:
    """All prompts of a batch are equally long for GIT and BLIP(-2) (one prompt, fixed image tokens), so
    no padding is involved. InternVL tiles each image by its aspect ratio: a 3:1 image gets fewer tiles,
    so its prompt is left-padded in the batch, and the attention mask and position ids keep its caption
    the same as when it is captioned alone."""
    batch = [images[0], images[1].resize((450, 150)), images[2]]
    one_by_one = captions_of(source, settings_of(settings_class, engine, batch_size=1), batch)
    assert captions_of(source, settings_of(settings_class, engine, batch_size=3), batch) == one_by_one
    if source == "internvl2":
        captioner = load_captioner(source, settings_of(settings_class, engine))
        assert isinstance(captioner, TransformersCaptioner)
        prompt_lengths = captioner.model_inputs(batch)["attention_mask"].sum(dim=1).tolist()
        assert len(set(prompt_lengths)) == 2, "the 3:1 image should have been padded"


@pytest.mark.parametrize(("source", "settings_class", "engine"), RUNNABLE, ids=IDS)
def test_full_variant_loads_a_saved_folder_like_the_tiny_one(
    source: str, settings_class: type[NeuralCaptioner], engine: str, images: list[Image.Image]
) -> None:
    tiny = settings_of(settings_class, engine, tiny_seed=2)
    captioner_class = engine_class(tiny)
    assert issubclass(captioner_class, TransformersCaptioner)
    folder = captioner_class.tiny_folder(2)
    assert (folder / "config.json").is_file()
    full = settings_of(settings_class, engine, variant="full", model=str(folder))
    assert captions_of(source, full, images) == captions_of(source, tiny, images)


@pytest.mark.parametrize(("source", "settings_class", "engine"), RUNNABLE, ids=IDS)
def test_missing_model_folder_is_named(
    source: str, settings_class: type[NeuralCaptioner], engine: str, tmp_path: Path
) -> None:
    missing = tmp_path / "no-such-model"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        load_captioner(source, settings_of(settings_class, engine, variant="full", model=str(missing)))


def test_prompts_default_per_engine_and_can_be_set(images: list[Image.Image]) -> None:
    assert load_captioner("small", SmallCaptioner()).prompt is None
    assert load_captioner("blip2", Blip2Captioner()).prompt is None
    internvl2 = load_captioner("internvl2", InternVL2Captioner(max_new_tokens=8))
    assert internvl2.prompt == "Describe the person in this photo in one detailed sentence."
    assert isinstance(internvl2, TransformersCaptioner)
    assert internvl2.prompt in internvl2.processor.decode(internvl2.model_inputs(images[:1])["input_ids"][0])
    prompted = load_captioner("small", SmallCaptioner(engine="blip", prompt="a photo of", max_new_tokens=8))
    plain = load_captioner("small", SmallCaptioner(engine="blip", max_new_tokens=8))
    assert prompted.caption(images) != plain.caption(images)


def test_tiny_folder_of_a_faster_worker_wins(tiny_cache: Path) -> None:
    """Workers write under a temporary name and rename into place; one that finds the folder already
    renamed in by another worker keeps that one and leaves no temporary folder behind."""

    other_worker = tiny_cache / "tiny-captioners" / f"RacedGitCaptioner-r{TINY_REVISION}-seed7"

    class RacedGitCaptioner(GitCaptioner):
        @classmethod
        def build_tiny(cls) -> tuple[GitForCausalLM, GitProcessor]:
            built = super().build_tiny()
            other_worker.mkdir()
            (other_worker / "written-by").write_text("the other worker")
            return built

    folder = RacedGitCaptioner.tiny_folder(7)
    assert folder == other_worker
    assert (folder / "written-by").read_text() == "the other worker"
    assert not [path for path in folder.parent.iterdir() if path.name.startswith(".")]


def test_load_captioner_checks_source_and_settings() -> None:
    with pytest.raises(ValueError, match="unknown neural caption source 'attribute'"):
        load_captioner("attribute", SmallCaptioner())
    with pytest.raises(TypeError, match="source blip2 takes Blip2Captioner settings"):
        load_captioner("blip2", SmallCaptioner())


def test_runtime_envs() -> None:
    lavis = runtime_env_for(Blip2Captioner(engine="lavis", variant="full", model="/models/blip2"))
    assert lavis is not None
    assert lavis["pip"]["packages"] == ["salesforce-lavis==1.0.2", "transformers==4.26.1"]
    assert lavis["env_vars"]["HF_HUB_OFFLINE"] == "1"
    lmdeploy = runtime_env_for(
        InternVL2Captioner(engine="lmdeploy", variant="full", model="/models/internvl2")
    )
    assert lmdeploy is not None
    assert lmdeploy["pip"]["packages"] == ["lmdeploy==0.18.0"]
    for settings in (SmallCaptioner(), SmallCaptioner(engine="blip"), Blip2Captioner(), InternVL2Captioner()):
        assert runtime_env_for(settings) is None
    image = {"image_uri": "registry.example/infu-lavis:1.0.2"}
    lavis_settings = Blip2Captioner(engine="lavis", variant="full", model="/models/blip2")
    assert runtime_env_for(lavis_settings.model_copy(update={"runtime_env": image})) == image
    lavis["pip"]["packages"].append("mutated")
    assert "mutated" not in runtime_env_for(lavis_settings)["pip"]["packages"]  # type: ignore[index]


def test_lavis_reads_every_file_from_the_model_folder() -> None:
    """The caption_coco_opt2.7b model config of LAVIS 1.0.2, as LAVIS loads it."""
    config = {
        "load_finetuned": True,
        "pretrained": "https://storage.googleapis.com/x/BLIP2/blip2_pretrained_opt2.7b.pth",
        "finetuned": "https://storage.googleapis.com/x/BLIP2/blip2_caption_opt2.7b.pth",
        "opt_model": "facebook/opt-2.7b",
    }
    folder = Path("/models/lavis-blip2")
    expected = [
        folder / "checkpoints" / "blip2_caption_opt2.7b.pth",
        folder / "checkpoints" / "eva_vit_g.pth",
        folder / "facebook" / "opt-2.7b",
        folder / "bert-base-uncased",
    ]
    assert required_paths(config, folder) == expected
    pretrain = {**config, "load_finetuned": False, "finetuned": ""}
    assert required_paths(pretrain, folder)[0] == folder / "checkpoints" / "blip2_pretrained_opt2.7b.pth"


def test_lavis_and_lmdeploy_have_no_tiny_variant() -> None:
    with pytest.raises(ValidationError, match="engine lavis has no tiny variant"):
        Blip2Captioner(engine="lavis")
    with pytest.raises(ValidationError, match="engine lmdeploy has no tiny variant"):
        InternVL2Captioner(engine="lmdeploy")
    with pytest.raises(ValueError, match="CUDA GPUs only"):
        InternVL2LmdeployCaptioner(
            InternVL2Captioner(engine="lmdeploy", variant="full", model="/m", device="cpu")
        )


@pytest.mark.skipif(LAVIS_INSTALLED, reason="LAVIS is installed here")
def test_without_lavis_the_error_names_its_runtime_env(tmp_path: Path) -> None:
    with pytest.raises(ImportError, match="salesforce-lavis==1.0.2 and transformers==4.26.1.*runtime env"):
        Blip2LavisCaptioner(Blip2Captioner(engine="lavis", variant="full", model=str(tmp_path)))


@pytest.mark.skipif(LMDEPLOY_INSTALLED, reason="lmdeploy is installed here")
def test_without_lmdeploy_the_error_names_its_runtime_env(tmp_path: Path) -> None:
    with pytest.raises(ImportError, match="lmdeploy==0.18.0.*runtime env"):
        InternVL2LmdeployCaptioner(InternVL2Captioner(engine="lmdeploy", variant="full", model=str(tmp_path)))


def test_lavis_names_the_files_a_model_folder_lacks(tmp_path: Path) -> None:
    pytest.importorskip("lavis", reason=LAVIS_SKIP)
    with pytest.raises(FileNotFoundError, match="checkpoints/eva_vit_g.pth"):
        Blip2LavisCaptioner(Blip2Captioner(engine="lavis", variant="full", model=str(tmp_path)))


def test_lmdeploy_names_a_missing_model_folder(tmp_path: Path) -> None:
    pytest.importorskip("lmdeploy", reason=LMDEPLOY_SKIP)
    missing = tmp_path / "InternVL2-8B"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        InternVL2LmdeployCaptioner(InternVL2Captioner(engine="lmdeploy", variant="full", model=str(missing)))
