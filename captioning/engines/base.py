"""What every caption engine shares: the ``Captioner`` interface, torch device and dtype from the settings,
and the tiny variant's model folders.

``variant: tiny`` writes a seeded random-init model of the engine's real class (``save_pretrained`` of
model and processor) into a cache folder keyed by engine class and seed, then loads it with exactly the
code that loads ``variant: full`` from ``settings.model``. The cache is ``$INFU_CACHE/tiny-captioners``
(default ``~/.cache/infu/tiny-captioners``); a folder is written under a temporary name and renamed into
place, so Ray workers that build the same one at once never read a half-written folder.

This module imports no transformers model class at run time: the LAVIS engine imports it inside a
runtime env whose transformers (4.26) predates most of them.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from abc import ABC, abstractmethod
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

import torch
from PIL import Image

from captioning.config import NeuralCaptioner
from infu.quality.torch_utils import TORCH_DTYPES, seeded

if TYPE_CHECKING:
    from transformers import BatchFeature, PreTrainedModel, ProcessorMixin

CACHE_ENV = "INFU_CACHE"
TINY_REVISION = 1
"""Part of every tiny folder's name: bump it when a tiny config or vocabulary changes."""
PERSON_PROMPT = "Describe the person in this photo in one detailed sentence."
"""The InternVL2 engines' default prompt."""
TINY_INIT_STD = 0.5
"""Weight init scale of the tiny models: large enough that captions depend on the image."""
TINY_WORDS = (
    "a", "the", "of", "with", "and", "in", "at", "person", "woman", "man", "young", "portrait", "photo",
    "smiling", "looking", "camera", "short", "long", "dark", "hair", "face", "shirt", "glasses", "wearing",
)  # fmt: skip
"""Whole words in the tiny vocabularies, so that tiny captions contain some."""


def torch_device(name: str) -> torch.device:
    """``settings.device`` as a torch device; ``auto`` is CUDA when this worker has a GPU, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def require_folder(path: Path, what: str) -> Path:
    """``path`` if it is a folder, else a ``FileNotFoundError`` naming it (models are never downloaded)."""
    if not Path(path).is_dir():
        raise FileNotFoundError(f"{what} folder {path} does not exist (models load from local files only)")
    return Path(path)


def tiny_cache_root() -> Path:
    """Where tiny model folders are written: ``$INFU_CACHE/tiny-captioners`` or ``~/.cache/infu/...``."""
    base = os.environ.get(CACHE_ENV)
    root = Path(base).expanduser() if base else Path.home() / ".cache" / "infu"
    return root / "tiny-captioners"


def byte_level_vocab(special_tokens: list[str]) -> dict[str, int]:
    """A byte-level BPE vocabulary without merges (GPT-2, OPT, Qwen2 tokenizers): the special tokens,
    printable ASCII, space (``Ġ``) and newline (``Ċ``), and whole words after a space. Text encodes
    character by character (other characters are dropped); generation can also emit the words."""
    symbols = [*special_tokens, *map(chr, range(33, 127)), "Ġ", "Ċ", *("Ġ" + word for word in TINY_WORDS)]
    return {symbol: index for index, symbol in enumerate(symbols)}


def wordpiece_vocab(special_tokens: list[str]) -> dict[str, int]:
    """A WordPiece vocabulary (BERT tokenizers): the special tokens, lowercase letters, digits and
    punctuation, their ``##`` continuations (so every ASCII word encodes), and whole words."""
    characters = [*"abcdefghijklmnopqrstuvwxyz0123456789", *".,;:!?'\"()-"]
    symbols = [*special_tokens, *characters, *("##" + character for character in characters), *TINY_WORDS]
    return {symbol: index for index, symbol in enumerate(symbols)}


class Captioner(ABC):
    """One neural caption engine, built once per worker: ``caption`` turns PIL images into one stripped
    caption each, generated greedily (reproducible) in batches of ``settings.batch_size``."""

    default_prompt: ClassVar[str | None] = None
    """The prompt when ``settings.prompt`` is null (None: plain captioning)."""

    def __init__(self, settings: NeuralCaptioner) -> None:
        self.settings = settings
        self.prompt = settings.prompt if settings.prompt is not None else self.default_prompt

    def caption(self, images: list[Image.Image]) -> list[str]:
        """Exactly one stripped caption per image, in order."""
        captions: list[str] = []
        size = self.settings.batch_size
        for start in range(0, len(images), size):
            batch = [
                image if image.mode == "RGB" else image.convert("RGB")
                for image in images[start : start + size]
            ]
            texts = self.generate(batch)
            if len(texts) != len(batch):
                raise RuntimeError(
                    f"{type(self).__name__} gave {len(texts)} captions for {len(batch)} images"
                )
            captions.extend(text.strip() for text in texts)
        return captions

    @abstractmethod
    def generate(self, images: list[Image.Image]) -> list[str]:
        """Greedy captions of one batch of RGB images, without the prompt."""


class TransformersCaptioner(Captioner):
    """An engine whose model and processor load with transformers' ``from_pretrained`` from a local folder:
    ``settings.model`` (variant full, ``local_files_only``) or the tiny folder (variant tiny)."""

    model_class: ClassVar[type[PreTrainedModel]]
    processor_class: ClassVar[type[ProcessorMixin]]

    def __init__(self, settings: NeuralCaptioner) -> None:
        super().__init__(settings)
        self.device = torch_device(settings.device)
        self.dtype = TORCH_DTYPES[settings.dtype]
        if settings.variant == "tiny":
            folder = self.tiny_folder(settings.tiny_seed)
        else:
            assert settings.model is not None  # the config requires it for variant full
            folder = require_folder(settings.model, f"{type(self).__name__} model")
        self.model = self.model_class.from_pretrained(
            str(folder), dtype=self.dtype, device_map=self.device, local_files_only=True
        )  # in eval mode
        self.processor = self.processor_class.from_pretrained(str(folder), local_files_only=True)

    @classmethod
    @abstractmethod
    def build_tiny(cls) -> tuple[PreTrainedModel, ProcessorMixin]:
        """A random-init model of the real class with a tiny config, and its locally built processor
        (called under a seeded RNG)."""

    @classmethod
    def tiny_folder(cls, seed: int) -> Path:
        """The tiny model of ``seed``, written (``save_pretrained``) into the cache on first use."""
        folder = tiny_cache_root() / f"{cls.__name__}-r{TINY_REVISION}-seed{seed}"
        if folder.is_dir():
            return folder
        folder.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
        try:
            with seeded(seed):
                model, processor = cls.build_tiny()
            model.save_pretrained(staging)
            processor.save_pretrained(staging)
            try:
                staging.rename(folder)
            except OSError:
                if not folder.is_dir():
                    raise
                # another worker renamed its identical copy into place first
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return folder

    @abstractmethod
    def model_inputs(self, images: list[Image.Image]) -> BatchFeature:
        """The processor's tensors for one batch: pixel values and the prompt's token ids."""

    def prompt_length(self, inputs: BatchFeature) -> int:
        """How many leading tokens of ``generate``'s output are the prompt, not the caption."""
        return int(inputs["input_ids"].shape[1])

    def generate(self, images: list[Image.Image]) -> list[str]:
        inputs = self.model_inputs(images).to(self.device, dtype=self.dtype)
        with torch.inference_mode():
            tokens = self.model.generate(  # type: ignore[operator]
                **inputs, do_sample=False, num_beams=1, max_new_tokens=self.settings.max_new_tokens
            )
        return list(
            self.processor.batch_decode(tokens[:, self.prompt_length(inputs) :], skip_special_tokens=True)
        )
