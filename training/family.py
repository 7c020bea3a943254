"""What the training loop needs of a model family (``model.family``): its models and objective, the
settings and data it takes, its validation images and its export. The loop itself
(:mod:`training.train`) is the same for every family.

* ``infu``: InfuseNet + identity projection on a frozen FLUX, flow matching
  (:mod:`training.objective`), exported in InfU's released layout.
* ``infinite_id``: the Infinite-ID adapter on a frozen SDXL, identity-enhanced training
  (:mod:`training.infinite_id`), exported as an adapter folder.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.distributed as dist
from PIL import Image

from infu.config import InfuConfig
from infu.quality.torch_utils import TORCH_DTYPES
from infu.steps import StepError, get_step
from training.config import TrainConfig
from training.data import PlannedSamples


@dataclass(frozen=True)
class FamilyModels:
    """A worker's models: the pipeline (frozen parts and the sampler), the module that trains (sharded
    when FSDP is on) and the objective whose ``loss(batch, generator)`` trains it."""

    pipeline: Any
    model: torch.nn.Module
    objective: Any


class TrainingFamily(ABC):
    """One model family's part in training; the loop holds one per run (:func:`training_family`)."""

    name: ClassVar[str]
    only_settings: ClassVar[tuple[str, ...]] = ()
    """Training settings (dotted) that only another family reads: changing one from its default is an
    error here."""

    def check(self, config: InfuConfig, step: str) -> None:
        """A :class:`StepError` for training settings this family does not read."""
        settings: TrainConfig = config.step(step)
        given = [name for name in self.only_settings if not _is_default(settings, name)]
        if given:
            raise StepError(
                f"{step}: {', '.join(given)} do(es) not apply to model.family {self.name}: remove them"
            )

    def embedding_space(self, config: InfuConfig) -> str:
        """The space of the identity embeddings the model takes."""
        return config.model.projection.embedding_space

    def reference_faces(self, models: FamilyModels) -> int | None:
        """Side of the aligned reference face crop a sample must carry (None: none)."""
        return None

    def encoded_cache(self, config: InfuConfig, inputs: dict[str, Path], models: FamilyModels) -> Any:
        """The precompute step's cache of the frozen encoders' outputs to read, if any (None: encode live)."""
        return None

    @abstractmethod
    def build(
        self, config: InfuConfig, settings: TrainConfig, device: torch.device, init: Path | None
    ) -> FamilyModels:
        """The models from ``init`` (an export of this family) or fresh, frozen and sharded as configured."""

    @abstractmethod
    def validation_identities(self, samples: PlannedSamples, count: int) -> list[Any]:
        """What :meth:`generate` takes for each of the first ``count`` identities."""

    @abstractmethod
    def generate(
        self,
        models: FamilyModels,
        config: InfuConfig,
        identity: Any,
        prompt: str,
        steps: int,
        generator: torch.Generator,
    ) -> Image.Image:
        """A validation image with the config's inference settings (every worker calls it: sharded models
        need all of them)."""

    @abstractmethod
    def export(self, models: FamilyModels, root: Path, config: InfuConfig, rank: int, identity: str) -> None:
        """Write the trained weights to ``root`` (a collective call)."""


def _is_default(section: Any, dotted: str) -> bool:
    """Whether setting ``dotted`` of ``section`` has its default value (whether or not it was written:
    a job reads the config written out whole)."""
    *parents, leaf = dotted.split(".")
    for parent in parents:
        section = getattr(section, parent)
    default = type(section).model_fields[leaf].get_default(call_default_factory=True)
    return getattr(section, leaf) == default


def _shard(settings: TrainConfig) -> bool:
    return settings.fsdp and dist.is_initialized()


class InfuFamily(TrainingFamily):
    name = "infu"

    def build(
        self, config: InfuConfig, settings: TrainConfig, device: torch.device, init: Path | None
    ) -> FamilyModels:
        from infu.model.factory import build_pipeline
        from infu.model.infu import InfU
        from training.objective import FlowMatchingObjective
        from training.parallelize import parallelize

        model_config = config.model.model_copy(update={"infu_model": init, "loras": [], "quantize": None})
        pipeline = build_pipeline(model_config, device=device, dtype=TORCH_DTYPES[settings.param_dtype])
        pipeline.set_progress_bar_config(disable=True)
        infu = InfU(pipeline.image_proj, pipeline.infusenet)
        parallelize(
            pipeline.transformer,
            infu,
            fsdp=_shard(settings),
            activation_checkpointing=settings.activation_checkpointing,
            param_dtype=TORCH_DTYPES[settings.param_dtype],
            device=device,
        )
        objective = FlowMatchingObjective(
            pipeline, infu, settings, config.model.inference.max_sequence_length
        )
        return FamilyModels(pipeline, infu, objective)

    def encoded_cache(self, config: InfuConfig, inputs: dict[str, Path], models: FamilyModels) -> Any:
        from training.precompute import step_cache

        return step_cache(config, inputs, models.objective.encoders)

    def validation_identities(self, samples: PlannedSamples, count: int) -> list[Any]:
        return list(samples.unit_embeddings(samples.validation_references(count)))

    def generate(
        self,
        models: FamilyModels,
        config: InfuConfig,
        identity: Any,
        prompt: str,
        steps: int,
        generator: torch.Generator,
    ) -> Image.Image:
        return models.pipeline(
            prompt=prompt, id_embedding=identity, num_inference_steps=steps, generator=generator
        ).images[0]

    def export(self, models: FamilyModels, root: Path, config: InfuConfig, rank: int, identity: str) -> None:
        from training.checkpoint import export_infu

        export_infu(models.model, root, config.model.infu_version, rank, identity)


class InfiniteIdFamily(TrainingFamily):
    name = "infinite_id"
    only_settings = ("guidance_scale", "infusenet_guidance_scale", "data.control_dropout", "data.mixture")

    def check(self, config: InfuConfig, step: str) -> None:
        if "spms" in get_step(step).upstream:
            raise StepError(f"{step}: SPMS pairs train InfU only; model.family is {self.name}")
        super().check(config, step)
        settings: TrainConfig = config.step(step)
        if not settings.data.empty_prompts:
            raise StepError(
                f"{step}: identity-enhanced training has no text prompt: set data.empty_prompts: true"
            )

    def embedding_space(self, config: InfuConfig) -> str:
        return config.model.infinite_id.embedding_space

    def reference_faces(self, models: FamilyModels) -> int | None:
        return models.pipeline.clip_vision.image_size

    def build(
        self, config: InfuConfig, settings: TrainConfig, device: torch.device, init: Path | None
    ) -> FamilyModels:
        from infu.model.factory import build_infinite_id_pipeline
        from training.infinite_id import IdentityEnhancedUNet, NoisePredictionObjective, parallelize_adapter

        model_settings = config.model.infinite_id.model_copy(update={"adapter": init})
        model_config = config.model.model_copy(update={"infinite_id": model_settings})
        dtype = TORCH_DTYPES[settings.param_dtype]
        pipeline = build_infinite_id_pipeline(model_config, device=device, dtype=dtype)
        pipeline.set_progress_bar_config(disable=True)
        model = IdentityEnhancedUNet(pipeline.adapter, pipeline.unet)
        parallelize_adapter(
            model,
            fsdp=_shard(settings),
            activation_checkpointing=settings.activation_checkpointing,
            param_dtype=dtype,
            device=device,
        )
        return FamilyModels(pipeline, model, NoisePredictionObjective(pipeline, model, settings))

    def validation_identities(self, samples: PlannedSamples, count: int) -> list[Any]:
        refs = samples.validation_references(count)
        faces = [samples.reference_face(ref)[None] for ref in refs]
        return list(zip(faces, samples.unit_embeddings(refs)[:, None], strict=True))

    def generate(
        self,
        models: FamilyModels,
        config: InfuConfig,
        identity: Any,
        prompt: str,
        steps: int,
        generator: torch.Generator,
    ) -> Image.Image:
        from training.infinite_id import unsharded

        pipeline = models.pipeline
        face, embedding = identity
        sampling = {**config.model.infinite_id_sampling(), "num_inference_steps": steps}
        with unsharded(models.model), torch.no_grad():
            tokens = pipeline.encode_identity(pipeline.clip_vision(face), embedding)
            return pipeline(prompt, id_embeddings=tokens, generator=generator, **sampling).images[0]

    def export(self, models: FamilyModels, root: Path, config: InfuConfig, rank: int, identity: str) -> None:
        from training.infinite_id import export_adapter

        export_adapter(models.model, root, rank, identity)


FAMILIES: dict[str, TrainingFamily] = {family.name: family for family in (InfuFamily(), InfiniteIdFamily())}


def training_family(config: InfuConfig) -> TrainingFamily:
    return FAMILIES[config.model.family]
