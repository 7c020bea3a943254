"""BLIP-2 OPT through LAVIS (``engine: lavis``), for LAVIS's COCO-finetuned captioning checkpoints.

salesforce-lavis 1.0.2 pins transformers<4.27, so it runs in a Ray runtime env of its own
(:data:`captioning.engines.RUNTIME_ENVS`), never in the main environment. Real checkpoints only: there is
no tiny variant.

LAVIS downloads everything by default; here ``settings.model`` is a folder that holds it all, laid out
under the names LAVIS asks for, and nothing is fetched:

- ``checkpoints/``: the files LAVIS would download into torch hub's cache, by file name: the model
  type's checkpoint (``blip2_caption_opt2.7b.pth`` for ``caption_coco_opt2.7b``: its config's
  ``finetuned``, or ``pretrained`` for the ``pretrain_*`` types) and the EVA ViT-g weights
  (``eva_vit_g.pth``). torch hub's folder points at ``settings.model`` while the model loads.
- ``facebook/opt-2.7b/``: the OPT decoder in transformers' format, at the model config's ``opt_model``.
- ``bert-base-uncased/``: the BERT tokenizer, config and weights the Q-Former is built from.

The two model names are opened as relative folders (the working directory is ``settings.model`` while
the model loads), and the runtime env sets HF_HUB_OFFLINE and TRANSFORMERS_OFFLINE besides.

Default prompt: the model type's own (``a photo of`` for the ``caption_coco_*`` types, which were
fine-tuned with it); the caption holds the continuation only. Precision is LAVIS's: float16 autocast on
a GPU, float32 on the CPU (``settings.dtype`` does not apply).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlparse

import torch
from PIL import Image

from captioning.config import Blip2Captioner
from captioning.engines import LAVIS_PINS
from captioning.engines.base import Captioner, require_folder, torch_device

EVA_VIT_G_FILE = "eva_vit_g.pth"
QFORMER_BERT = "bert-base-uncased"


def required_paths(model_config: Mapping[str, Any], folder: Path) -> list[Path]:
    """The files and folders LAVIS reads to build ``blip2_opt`` from its ``model:`` config, in ``folder``."""
    checkpoint_url = (
        model_config["finetuned"] if model_config.get("load_finetuned", True) else model_config["pretrained"]
    )
    checkpoint = PurePosixPath(urlparse(checkpoint_url).path).name
    return [
        folder / "checkpoints" / checkpoint,
        folder / "checkpoints" / EVA_VIT_G_FILE,
        folder / model_config["opt_model"],
        folder / QFORMER_BERT,
    ]


@contextlib.contextmanager
def torch_hub_dir(folder: Path) -> Iterator[None]:
    """Point torch hub's cache (where LAVIS and timm look for downloaded weights) at ``folder``."""
    previous = torch.hub.get_dir()
    torch.hub.set_dir(str(folder))
    try:
        yield
    finally:
        torch.hub.set_dir(previous)


class Blip2LavisCaptioner(Captioner):
    """LAVIS ``blip2_opt`` of ``settings.lavis_model_type``, loaded from ``settings.model``."""

    def __init__(self, settings: Blip2Captioner) -> None:
        super().__init__(settings)
        assert settings.model is not None, "the config requires variant full (a model folder) here"
        try:
            from lavis.common.registry import registry  # type: ignore[import-not-found]
            from lavis.models import load_model_and_preprocess  # type: ignore[import-not-found]
            from omegaconf import OmegaConf  # type: ignore[import-not-found]
        except ImportError as error:
            raise ImportError(
                f"engine lavis needs {' and '.join(LAVIS_PINS)}, which cannot share the main environment: "
                "run it in its Ray runtime env (captioning.engines.runtime_env_for) or an image with them"
            ) from error
        folder = require_folder(settings.model, "LAVIS BLIP-2")
        model_class = registry.get_model_class("blip2_opt")
        if settings.lavis_model_type not in model_class.PRETRAINED_MODEL_CONFIG_DICT:
            known = ", ".join(model_class.PRETRAINED_MODEL_CONFIG_DICT)
            raise ValueError(
                f"LAVIS blip2_opt has no model type {settings.lavis_model_type!r}: one of {known}"
            )
        model_config = OmegaConf.load(model_class.default_config_path(settings.lavis_model_type)).model
        missing = [str(path) for path in required_paths(model_config, folder) if not path.exists()]
        if missing:
            raise FileNotFoundError(f"LAVIS {settings.lavis_model_type} needs {', '.join(missing)}")
        self.device = torch_device(settings.device)
        with contextlib.chdir(folder), torch_hub_dir(folder):
            self.model, processors, _ = load_model_and_preprocess(
                name="blip2_opt", model_type=settings.lavis_model_type, is_eval=True, device=str(self.device)
            )
        self.preprocess = processors["eval"]

    def generate(self, images: list[Image.Image]) -> list[str]:
        batch = torch.stack([self.preprocess(image) for image in images]).to(self.device)
        samples = {"image": batch} if self.prompt is None else {"image": batch, "prompt": self.prompt}
        with torch.inference_mode():  # LAVIS hands max_length to OPT as max_new_tokens
            return list(
                self.model.generate(
                    samples, use_nucleus_sampling=False, num_beams=1, max_length=self.settings.max_new_tokens
                )
            )
