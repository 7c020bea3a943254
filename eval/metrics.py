"""Evaluation metrics, per image and aggregated with bootstrap confidence intervals.

- ID Loss (InfU): 1 - cosine of the identity embeddings of the reference photo's and the generated
  image's largest faces, by the configured face stack. An image without a face scores
  :data:`NO_FACE_ID_LOSS` = 2, the supremum of 1 - cosine, so dropping a face never beats drawing a
  wrong one; such images are counted (:attr:`FaceMatch.faces` = 0).
- CLIPScore (InfU): cosine of CLIP image and text embeddings (not x100; CLIP ViT-L/14 in production).
  ``torchmetrics.multimodal.CLIPScore`` reports ``max(100 x cosine, 0)``: the same value x 100, clamped.
- PickScore (InfU): PickScore_v1 (a CLIP ViT-H/14) with the CLIP-H processor, ``logit_scale.exp()`` x
  cosine of image and text embeddings.
- CLIP-T / CLIP-I (Infinite-ID) through open_clip (ViT-H/14 in production): image-text cosine, and
  image-image cosine of ArcFace-aligned face crops; a missing face scores :data:`NO_FACE_SIMILARITY`.
- Face-recognition similarity (Infinite-ID's FaceNet row): :attr:`FaceMatch.similarity` of an
  :class:`IdentityScorer` on the recognizer configured for it.
- FID through torchmetrics on a feature module (:class:`ClipImageFeatures`); LPIPS diversity through
  torchmetrics with backbone weights from a local folder (:class:`LpipsDiversity`).
- :func:`bootstrap_ci`: mean and percentile interval, resampling prompts and identities.

Models load from local paths only (never downloaded); ``tiny`` constructors build random-init models of
the real architectures at toy size for the embedded profile.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Hashable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import open_clip
import torch
import torchvision
from PIL import Image
from torch import nn
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTextConfig

from infu.face import Face, FaceAnalyzer, align_face, id_loss, largest_face
from infu.face.base import normalize_rows
from infu.images import ImageInput
from infu.model.tiny import CLIP_MAX_LENGTH, TINY_CLIP_WIDTH, tiny_clip_tokenizer
from infu.quality.clip import TINY_IMAGE_SIZE, TINY_PROJECTION_DIM, tiny_clip_config
from infu.quality.torch_utils import seeded

NO_FACE_ID_LOSS = 2.0
"""ID Loss of an image without a face: 1 - (-1), the worst value 1 - cosine can take."""
NO_FACE_SIMILARITY = -1.0
"""Face similarity (cosine) of an image without a face: the worst value a cosine can take."""
CLIP_I_CROP_SIZE = 224
"""Side of the ArcFace-aligned face crops CLIP-I compares."""

LpipsNet = Literal["alex", "vgg", "squeeze"]
LPIPS_BACKBONES: dict[LpipsNet, tuple[str, str]] = {
    "alex": ("alexnet", "AlexNet_Weights"),
    "vgg": ("vgg16", "VGG16_Weights"),
    "squeeze": ("squeezenet1_1", "SqueezeNet1_1_Weights"),
}
"""LPIPS backbone -> (torchvision model, its weights enum), as torchmetrics' LPIPS builds them."""
TINY_OPEN_CLIP_CONFIG: dict[str, Any] = {
    "embed_dim": TINY_PROJECTION_DIM,
    "vision_cfg": {
        "image_size": TINY_IMAGE_SIZE,
        "layers": 2,
        "width": 32,
        "head_width": 8,
        "patch_size": 8,
    },
    "text_cfg": {
        "context_length": CLIP_MAX_LENGTH,
        "vocab_size": 49408,
        "width": 32,
        "heads": 4,
        "layers": 2,
    },
}
"""open_clip ViT-H-14's config (its keys, CLIP's 49408-token vocabulary) at toy size."""


def face_id_loss(reference: np.ndarray, faces: Sequence[Face]) -> float:
    """ID Loss of an image's faces against a reference embedding: its largest face's, or
    :data:`NO_FACE_ID_LOSS` when it has none."""
    face = largest_face(faces)
    return NO_FACE_ID_LOSS if face is None else id_loss(reference, face.embedding)


def aligned_face_crop(rgb: np.ndarray, face: Face, size: int = CLIP_I_CROP_SIZE) -> Image.Image:
    """The ArcFace-aligned ``size`` x ``size`` crop of ``face`` in the RGB array ``rgb``."""
    return Image.fromarray(align_face(rgb, face.kps, size))


@dataclass(frozen=True)
class Reference:
    """An identity photo's largest face: its embedding and aligned crop."""

    embedding: np.ndarray
    crop: Image.Image


@dataclass(frozen=True)
class FaceMatch:
    """A generated image against a reference: ID Loss, how many faces it has, its largest face's crop."""

    id_loss: float
    faces: int
    crop: Image.Image | None

    @property
    def similarity(self) -> float:
        """Cosine of the two identity embeddings (:data:`NO_FACE_SIMILARITY` without a face)."""
        return 1.0 - self.id_loss


class IdentityScorer:
    """ID Loss and face crops through a face analyzer (``infu.face.load_face_analyzer``)."""

    def __init__(self, analyzer: FaceAnalyzer, crop_size: int = CLIP_I_CROP_SIZE) -> None:
        self.analyzer = analyzer
        self.crop_size = crop_size

    def reference(self, photo: ImageInput, name: str | None = None) -> Reference:
        """The reference photo's largest face; :class:`infu.face.NoFaceError` when it has none."""
        rgb = self.analyzer.load(photo)
        source = name or (str(photo) if isinstance(photo, (str, Path)) else None)
        face = self.analyzer.require_largest(rgb, source)
        return Reference(face.embedding, aligned_face_crop(rgb, face, self.crop_size))

    def match(self, reference: Reference, image: ImageInput) -> FaceMatch:
        """``image`` scored against ``reference``."""
        rgb = self.analyzer.load(image)
        faces = self.analyzer.analyze_rgb(rgb)
        face = largest_face(faces)
        return FaceMatch(
            id_loss=face_id_loss(reference.embedding, faces),
            faces=len(faces),
            crop=None if face is None else aligned_face_crop(rgb, face, self.crop_size),
        )


def _projected(output: Any) -> torch.Tensor:
    """Projected CLIP features: transformers 5 returns them as ``pooler_output``, 4.x as a tensor."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def tiny_clip_model(seed: int) -> tuple[CLIPModel, CLIPProcessor]:
    """A random-init CLIP (seeded, global RNG untouched) with ViT-L/14's layout at toy size, and its
    processor: CLIP's image preprocessing at 64 px and the project's byte-level tiny tokenizer."""
    tokenizer = tiny_clip_tokenizer()
    text_config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=TINY_CLIP_WIDTH,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=CLIP_MAX_LENGTH,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    config = CLIPConfig(
        text_config=text_config.to_dict(),
        vision_config=tiny_clip_config().to_dict(),
        projection_dim=TINY_PROJECTION_DIM,
    )
    with seeded(seed):
        model = CLIPModel(config)
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": TINY_IMAGE_SIZE},
        crop_size={"height": TINY_IMAGE_SIZE, "width": TINY_IMAGE_SIZE},
    )
    return model, CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer)


class ClipScorer:
    """CLIPScore as the InfU paper reports it: per image, the cosine of its CLIP embedding and its
    prompt's (transformers ``CLIPModel`` + ``CLIPProcessor``)."""

    def __init__(
        self, model: CLIPModel, processor: CLIPProcessor, device: str = "cpu", batch_size: int = 16
    ) -> None:
        self.model = model.eval().to(torch.device(device))
        self.processor = processor
        self.device = device
        self.batch_size = batch_size

    @classmethod
    def from_pretrained(
        cls, model_path: Path, processor_path: Path | None = None, device: str = "cpu", batch_size: int = 16
    ) -> ClipScorer:
        """Model and processor from local transformers folders (the processor's defaults to the model's);
        never downloads."""
        for path in (model_path, processor_path or model_path):
            if not Path(path).is_dir():
                raise FileNotFoundError(f"CLIP folder {path} does not exist")
        model = CLIPModel.from_pretrained(str(model_path), local_files_only=True)
        processor = CLIPProcessor.from_pretrained(str(processor_path or model_path), local_files_only=True)
        return cls(model, processor, device, batch_size)

    @classmethod
    def tiny(cls, seed: int = 0, device: str = "cpu", batch_size: int = 16) -> ClipScorer:
        """The embedded profile's scorer: :func:`tiny_clip_model`."""
        return cls(*tiny_clip_model(seed), device=device, batch_size=batch_size)

    def _batched(self, items: Sequence[Any], embed: Callable[[list[Any]], torch.Tensor]) -> np.ndarray:
        chunks = [np.zeros((0, self.model.config.projection_dim), dtype=np.float32)]
        with torch.inference_mode():
            for start in range(0, len(items), self.batch_size):
                features = embed(list(items[start : start + self.batch_size]))
                chunks.append(features.float().cpu().numpy())
        return normalize_rows(np.concatenate(chunks))

    def image_embeddings(self, images: Sequence[Image.Image]) -> np.ndarray:
        """``[N, D]`` unit-norm float32 image embeddings."""

        def embed(batch: list[Image.Image]) -> torch.Tensor:
            rgb = [image.convert("RGB") for image in batch]
            pixels = self.processor(images=rgb, return_tensors="pt")["pixel_values"].to(self.device)
            return _projected(self.model.get_image_features(pixel_values=pixels))

        return self._batched(images, embed)

    def text_embeddings(self, texts: Sequence[str]) -> np.ndarray:
        """``[N, D]`` unit-norm float32 text embeddings (texts truncated to the model's context)."""

        def embed(batch: list[str]) -> torch.Tensor:
            tokens = self.processor(
                text=batch,
                padding=True,
                truncation=True,
                max_length=self.model.config.text_config.max_position_embeddings,
                return_tensors="pt",
            ).to(self.device)
            return _projected(
                self.model.get_text_features(
                    input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"]
                )
            )

        return self._batched(texts, embed)

    def cosine(self, images: Sequence[Image.Image], texts: Sequence[str]) -> np.ndarray:
        """``[N]`` cosine of image ``i`` and text ``i``."""
        if len(images) != len(texts):
            raise ValueError(f"{len(images)} images but {len(texts)} texts")
        return np.sum(self.image_embeddings(images) * self.text_embeddings(texts), axis=1)

    def score(self, images: Sequence[Image.Image], texts: Sequence[str]) -> np.ndarray:
        """``[N]`` CLIPScore of image ``i`` for text ``i``: the cosine, unclamped."""
        return self.cosine(images, texts)


class PickScorer(ClipScorer):
    """PickScore: ``logit_scale.exp()`` x cosine with the PickScore_v1 model and the CLIP-H processor
    (``from_pretrained(pickscore_folder, clip_h_processor_folder)``)."""

    def score(self, images: Sequence[Image.Image], texts: Sequence[str]) -> np.ndarray:
        """``[N]`` PickScore of image ``i`` for text ``i``."""
        return self.model.logit_scale.exp().item() * self.cosine(images, texts)


class ClipImageFeatures(nn.Module):
    """A ``ClipScorer``'s image embeddings as a torchmetrics FID feature extractor: uint8
    ``[N, 3, H, W]`` images -> ``[N, D]`` features."""

    def __init__(self, scorer: ClipScorer) -> None:
        super().__init__()
        self.scorer = scorer
        self.model = scorer.model
        self.num_features = int(scorer.model.config.projection_dim)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        pil = [Image.fromarray(image.permute(1, 2, 0).cpu().numpy()) for image in images]
        return torch.from_numpy(self.scorer.image_embeddings(pil))


def image_tensor(image: Image.Image) -> torch.Tensor:
    """A PIL image as the uint8 ``[3, H, W]`` RGB tensor torchmetrics' image metrics take."""
    return torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1).contiguous()


def frechet_distance(
    real: Sequence[Image.Image], generated: Sequence[Image.Image], features: nn.Module
) -> float:
    """FID between two image sets (at least 2 each) on ``features`` (torchmetrics'
    ``FrechetInceptionDistance`` with a custom feature module; images of any size, one at a time)."""
    metric = FrechetInceptionDistance(feature=features)
    for images, is_real in ((real, True), (generated, False)):
        for image in images:
            metric.update(image_tensor(image)[None], real=is_real)
    return float(metric.compute())


def lpips_weights_file(net: LpipsNet) -> str:
    """File name of the torchvision backbone weights torchmetrics' LPIPS ``net`` loads."""
    _, weights_enum = LPIPS_BACKBONES[net]
    return Path(getattr(torchvision.models, weights_enum).DEFAULT.url).name


@contextmanager
def _torch_hub_dir(folder: Path) -> Iterator[None]:
    previous = torch.hub.get_dir()
    torch.hub.set_dir(str(folder))
    try:
        yield
    finally:
        torch.hub.set_dir(previous)


def write_random_lpips_backbone(hub_dir: Path, net: LpipsNet = "squeeze", seed: int = 0) -> Path:
    """Random-init (seeded) backbone weights of ``net`` where :class:`LpipsDiversity` reads them: the
    embedded profile's stand-in for the ImageNet weights."""
    model_name, _ = LPIPS_BACKBONES[net]
    with seeded(seed):
        model = getattr(torchvision.models, model_name)(weights=None)
    path = Path(hub_dir) / "checkpoints" / lpips_weights_file(net)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path)
    return path


class LpipsDiversity:
    """LPIPS (torchmetrics) with its backbone weights read from ``hub_dir``, laid out as torch hub's
    cache: ``<hub_dir>/checkpoints/<lpips_weights_file(net)>``. Never downloads: a missing file is an
    error. The linear heads are the LPIPS weights torchmetrics ships."""

    def __init__(self, hub_dir: Path, net: LpipsNet = "alex", device: str = "cpu") -> None:
        weights = Path(hub_dir) / "checkpoints" / lpips_weights_file(net)
        if not weights.is_file():
            raise FileNotFoundError(f"LPIPS {net} backbone weights {weights} are missing (never downloaded)")
        with _torch_hub_dir(Path(hub_dir)):
            self.metric = LearnedPerceptualImagePatchSimilarity(
                net_type=net, reduction="none", normalize=True
            ).to(device)
        self.device = device

    def distances(self, firsts: Sequence[Image.Image], seconds: Sequence[Image.Image]) -> np.ndarray:
        """``[N]`` LPIPS distance of image ``i`` of ``firsts`` and of ``seconds`` (all of one size)."""
        images = [*firsts, *seconds]
        if len(firsts) != len(seconds) or not firsts:
            raise ValueError(f"LPIPS needs pairs: got {len(firsts)} and {len(seconds)} images")
        if len({image.size for image in images}) > 1:
            raise ValueError(f"LPIPS compares images of one size, got {sorted({i.size for i in images})}")
        batches = [
            torch.stack([image_tensor(image) for image in side]).float().div(255).to(self.device)
            for side in (firsts, seconds)
        ]
        self.metric.reset()
        with torch.inference_mode():
            self.metric.update(*batches)
            values = self.metric.compute()
        self.metric.reset()
        return np.atleast_1d(values.cpu().numpy())

    def diversity(self, images: Sequence[Image.Image]) -> float:
        """Mean LPIPS distance over all unordered pairs of ``images`` (at least 2, one size)."""
        if len(images) < 2:
            raise ValueError(f"LPIPS diversity needs at least 2 images, got {len(images)}")
        firsts, seconds = zip(*itertools.combinations(images, 2), strict=True)
        return float(self.distances(firsts, seconds).mean())


class OpenClipScorer:
    """Infinite-ID's CLIP-T (image-text cosine) and CLIP-I (image-image cosine) through open_clip."""

    def __init__(
        self,
        model: open_clip.CLIP,
        preprocess: Callable[[Image.Image], torch.Tensor],
        tokenizer: Callable[[list[str]], torch.Tensor],
        device: str = "cpu",
        batch_size: int = 16,
    ) -> None:
        self.model = model.eval().to(torch.device(device))
        self.preprocess = preprocess
        self.tokenizer = tokenizer
        self.device = device
        self.batch_size = batch_size

    @classmethod
    def from_checkpoint(
        cls, model_name: str, weights: Path, device: str = "cpu", batch_size: int = 16
    ) -> OpenClipScorer:
        """open_clip's ``model_name`` architecture (e.g. ``ViT-H-14``) with weights from a local file
        (``open_clip.load_checkpoint``); never downloads."""
        if not Path(weights).is_file():
            raise FileNotFoundError(f"open_clip weights {weights} do not exist")
        model, _, preprocess = open_clip.create_model_and_transforms(model_name, pretrained=None)
        open_clip.load_checkpoint(model, str(weights))
        return cls(model, preprocess, open_clip.get_tokenizer(model_name), device, batch_size)

    @classmethod
    def tiny(cls, seed: int = 0, device: str = "cpu", batch_size: int = 16) -> OpenClipScorer:
        """Random-init (seeded) open_clip CLIP of :data:`TINY_OPEN_CLIP_CONFIG`, CLIP's BPE tokenizer
        (shipped with open_clip)."""
        with seeded(seed):
            model = open_clip.CLIP(**TINY_OPEN_CLIP_CONFIG)
        preprocess = open_clip.image_transform(TINY_IMAGE_SIZE, is_train=False)
        return cls(model, preprocess, open_clip.get_tokenizer("ViT-H-14"), device, batch_size)

    def _batched(self, items: Sequence[Any], embed: Callable[[list[Any]], torch.Tensor]) -> np.ndarray:
        chunks = [np.zeros((0, int(self.model.text_projection.shape[1])), dtype=np.float32)]
        with torch.inference_mode():
            for start in range(0, len(items), self.batch_size):
                chunks.append(embed(list(items[start : start + self.batch_size])).float().cpu().numpy())
        return normalize_rows(np.concatenate(chunks))

    def image_embeddings(self, images: Sequence[Image.Image]) -> np.ndarray:
        """``[N, D]`` unit-norm float32 image embeddings."""

        def embed(batch: list[Image.Image]) -> torch.Tensor:
            pixels = torch.stack([self.preprocess(image.convert("RGB")) for image in batch]).to(self.device)
            return self.model.encode_image(pixels)

        return self._batched(images, embed)

    def text_embeddings(self, texts: Sequence[str]) -> np.ndarray:
        """``[N, D]`` unit-norm float32 text embeddings."""
        return self._batched(
            texts, lambda batch: self.model.encode_text(self.tokenizer(batch).to(self.device))
        )

    def clip_t(self, images: Sequence[Image.Image], texts: Sequence[str]) -> np.ndarray:
        """``[N]`` CLIP-T: cosine of image ``i`` and text ``i``."""
        if len(images) != len(texts):
            raise ValueError(f"{len(images)} images but {len(texts)} texts")
        return np.sum(self.image_embeddings(images) * self.text_embeddings(texts), axis=1)

    def clip_i(self, crops: Sequence[Image.Image | None], references: Sequence[Image.Image]) -> np.ndarray:
        """``[N]`` CLIP-I: cosine of face crop ``i`` and reference crop ``i``; a missing crop (no face)
        scores :data:`NO_FACE_SIMILARITY`."""
        if len(crops) != len(references):
            raise ValueError(f"{len(crops)} crops but {len(references)} references")
        found = [index for index, crop in enumerate(crops) if crop is not None]
        scores = np.full(len(crops), NO_FACE_SIMILARITY, dtype=np.float32)
        if found:
            generated = self.image_embeddings([crops[index] for index in found])  # type: ignore[misc]
            reference = self.image_embeddings([references[index] for index in found])
            scores[found] = np.sum(generated * reference, axis=1)
        return scores


@dataclass(frozen=True)
class Interval:
    """A mean and its bootstrap confidence interval."""

    mean: float
    low: float
    high: float
    count: int


def bootstrap_ci(
    values: Sequence[float],
    *groups: Sequence[Hashable],
    n: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> Interval:
    """The mean of ``values`` and its percentile bootstrap interval at ``level``.

    ``groups`` are crossed grouping factors, one label per value each (e.g. the prompt ids and the
    identity names). Each replicate resamples every factor's units independently with replacement (the
    pigeonhole bootstrap for crossed designs): a value enters with weight the product of its units'
    multiplicities, so values sharing a prompt or an identity move together. Without groups, values
    resample one by one. A replicate that happens to keep no observed value (possible only with very few
    units, as pairings are not fully crossed) is left out. Deterministic for a ``seed``.
    """
    data = np.asarray(values, dtype=np.float64)
    if data.ndim != 1 or data.size == 0:
        raise ValueError("bootstrap_ci needs a non-empty 1-D sequence of values")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    factors = [list(group) for group in groups] or [list(range(data.size))]
    for factor in factors:
        if len(factor) != data.size:
            raise ValueError(f"a group has {len(factor)} labels for {data.size} values")
    rng = np.random.default_rng(seed)
    weights = np.ones((n, data.size))
    for factor in factors:
        index = {label: position for position, label in enumerate(dict.fromkeys(factor))}
        unit = np.array([index[label] for label in factor])
        units = len(index)
        multiplicity = rng.multinomial(units, np.full(units, 1.0 / units), size=n)
        weights *= multiplicity[:, unit]
    totals = weights.sum(axis=1)
    kept = totals > 0
    replicates = (weights[kept] @ data) / totals[kept]
    tail = (1 - level) / 2
    low, high = np.quantile(replicates, [tail, 1 - tail])
    return Interval(mean=float(data.mean()), low=float(low), high=float(high), count=int(data.size))
