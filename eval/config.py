"""The evaluation sections: ``benchmark:`` (which images to make: the benchmark, its identities, the model
versions and other methods' images) and ``eval:`` (how to score them). Two sections, so that changing a
scoring model rescored without generating again."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from infu.config import Resources, Section
from infu.model.config import InfiniteIdSwitches
from infu.paths import ResolvedPath

MODEL_NAME = r"^[A-Za-z0-9][A-Za-z0-9_-]*$"
TRAINED_MODELS = ("stage1", "stage2")
"""Training steps whose exports the benchmark can generate with (the step's upstream)."""


class BaselineImages(Section):
    """Another method's images of the same pairs (PuLID-FLUX, IP-Adapter...), scored with the same
    harness: ``mapping`` is a YAML list of ``{identity, prompt, image}`` (prompt: its text or its id;
    image: a file in ``images``) with an optional ``index`` (the seed's index, default 0)."""

    images: ResolvedPath
    mapping: ResolvedPath


class InfiniteIdAblation(InfiniteIdSwitches):
    """An Infinite-ID ablation: the model version ``model`` (a name in ``models`` or ``checkpoints``)
    generated with these inference switches (unset ones: the paper's inference, mixed attention with
    AdaIN-mean) instead of ``model.infinite_id``'s."""

    model: str


class BenchmarkConfig(Section):
    """``python -m eval generate`` (step ``benchmark``): every identity with every prompt its gender
    pairs with, one image per seed, for each model version."""

    file: ResolvedPath | None = Field(
        None, description="benchmark YAML; null: the packaged eval/benchmark.yaml"
    )
    identities: ResolvedPath = Field(
        description="a folder with identities.yaml, or the sample corpus (identity_source: sample_corpus)"
    )
    identity_source: Literal["manifest", "sample_corpus"] = "manifest"
    prompts_per_tag: int | None = Field(
        None, ge=1, description="only the first N prompts of each gender tag (a quick subset); null: all"
    )
    models: list[str] = Field(
        default_factory=lambda: list(TRAINED_MODELS),
        description="training steps of this run whose exports are evaluated (stage1, stage2)",
    )
    checkpoints: dict[str, ResolvedPath] = Field(
        default_factory=dict,
        description="further checkpoints by name: InfU's released layout (model.family infu), "
        "InfiniteIdAdapter folders (infinite_id)",
    )
    baselines: dict[str, BaselineImages] = Field(default_factory=dict)
    ablations: dict[str, InfiniteIdAblation] = Field(
        default_factory=dict,
        description="Infinite-ID ablations by name (model.family infinite_id): a model version of "
        "models or checkpoints with some of model.infinite_id's switches changed",
    )
    pairs_per_shard: int = Field(64, ge=1)
    resources: Resources = Resources()

    @model_validator(mode="after")
    def _names_are_distinct_and_known(self) -> BenchmarkConfig:
        import re

        unknown = [name for name in self.models if name not in TRAINED_MODELS]
        if unknown:
            raise ValueError(f"models {unknown} are not training steps; known: {list(TRAINED_MODELS)}")
        names = [*self.models, *self.checkpoints, *self.baselines, *self.ablations]
        repeated = sorted({name for name in names if names.count(name) > 1})
        if repeated:
            raise ValueError(
                f"model names repeat across models, checkpoints, baselines and ablations: {repeated}"
            )
        generated = [*self.models, *self.checkpoints]
        unbased = {
            name: ablation.model
            for name, ablation in self.ablations.items()
            if ablation.model not in generated
        }
        if unbased:
            raise ValueError(
                f"ablations {unbased}: their model must be a name in models or checkpoints: {generated}"
            )
        bad = [name for name in names if not re.match(MODEL_NAME, name)]
        if bad:
            raise ValueError(f"model names {bad} must match {MODEL_NAME} (they name shards)")
        if not names:
            raise ValueError("nothing to evaluate: models, checkpoints and baselines are all empty")
        return self


class ScoringModel(Section):
    """A local transformers CLIP folder (``path``; ``processor`` when the processor lives elsewhere), or a
    tiny random-init model of the real architecture from ``tiny_seed`` (embedded)."""

    path: ResolvedPath | None = None
    processor: ResolvedPath | None = None
    tiny_seed: int | None = None

    @model_validator(mode="after")
    def _one_source(self) -> ScoringModel:
        if (self.path is None) == (self.tiny_seed is None):
            raise ValueError("set exactly one of path (a local model folder) and tiny_seed")
        return self


class OpenClipModel(Section):
    """Infinite-ID's CLIP-T/CLIP-I model through open_clip: ``model_name`` + local ``weights``, or tiny."""

    model_name: str = "ViT-H-14"
    weights: ResolvedPath | None = None
    tiny_seed: int | None = None

    @model_validator(mode="after")
    def _one_source(self) -> OpenClipModel:
        if (self.weights is None) == (self.tiny_seed is None):
            raise ValueError("set exactly one of weights (a local open_clip checkpoint) and tiny_seed")
        return self


class LpipsConfig(Section):
    """LPIPS diversity (torchmetrics): the backbone's torchvision weights file in ``hub_dir/checkpoints``,
    or a seeded random squeezenet written there (``tiny_seed``, embedded)."""

    net: Literal["alex", "vgg", "squeeze"] = "alex"
    hub_dir: ResolvedPath | None = None
    tiny_seed: int | None = None

    @model_validator(mode="after")
    def _one_source(self) -> LpipsConfig:
        if (self.hub_dir is None) == (self.tiny_seed is None):
            raise ValueError("set exactly one of hub_dir (local torchvision weights) and tiny_seed")
        if self.tiny_seed is not None and self.net != "squeeze":
            raise ValueError("a tiny LPIPS backbone is a squeezenet: set net: squeeze")
        return self


class EvalConfig(Section):
    """``python -m eval score`` (step ``eval``): per image ID Loss (the run's face stack), CLIPScore,
    PickScore, CLIP-T, CLIP-I, face similarity; per model bootstrap intervals, FID against the identity
    photos and LPIPS diversity; the report."""

    clip: ScoringModel = Field(description="CLIPScore's CLIP (ViT-L/14 in the paper)")
    pickscore: ScoringModel = Field(description="PickScore_v1 with the CLIP-H processor")
    open_clip: OpenClipModel
    lpips: LpipsConfig | None = None
    fid: bool = Field(
        True, description="FID of each model's images against the identity photos (CLIP features)"
    )
    bootstrap_samples: int = Field(1000, ge=100)
    seed: int = 0
    worst: int = Field(8, ge=1, description="images per worst-case gallery")
    resources: Resources = Resources()
