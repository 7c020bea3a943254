"""The training sections (``stage1:`` and ``stage2:``): data, objective, optimiser, distribution,
checkpoints, logging and the planner's setup. Paper values are in ``configs/flux-dev.yaml``."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from infu.captions import MixtureConfig
from infu.config import JobResources, Resources, Section
from infu.model.config import LATENT_PIXEL_MULTIPLE
from infu.paths import ResolvedPath
from training.plan import PlanConfig, accumulation_steps


class DataConfig(Section):
    """What one training sample is: the target image in its aspect-ratio bucket, its caption, the identity
    embedding of the reference face, the target's keypoints (stage 1: a kept portrait of the filter with
    a caption drawn from the caption mixture; stage 2: an SPMS pair, see :class:`PairTrainConfig`)."""

    micro_batch: int = Field(4, ge=1, description="samples per worker per forward pass")
    max_side: int | None = Field(
        None,
        ge=LATENT_PIXEL_MULTIPLE,
        multiple_of=LATENT_PIXEL_MULTIPLE,
        description="scale the buckets down to this longer side (null: train at the bucket size)",
    )
    control_dropout: float = Field(0.1, ge=0, lt=1, description="share of samples with a black control")
    reference: Literal["target", "same_identity"] = Field(
        "target",
        description="the face giving the identity embedding: the target's own (stage 1), or another photo "
        "of the target's person: its dataset identity label, else its filter identity cluster "
        "(Infinite-ID's identity-enhanced training)",
    )
    empty_prompts: bool = Field(False, description="train without text (identity-enhanced training)")
    mixture: MixtureConfig = MixtureConfig()
    shuffle_seed: int = Field(0, description="with the epoch, orders shards and samples")


class TimestepConfig(Section):
    """Timesteps: u in (0, 1), logit-normal(mean, std) as in SD3/FLUX training, or uniform. Flow matching
    (InfU) trains at t = u; noise prediction (Infinite-ID) at step floor(u x 1000) (uniform: DDPM's)."""

    sampling: Literal["logit_normal", "uniform"] = "logit_normal"
    logit_mean: float = 0.0
    logit_std: float = Field(1.0, gt=0)


class OptimizerConfig(Section):
    """AdamW with linear warmup to a constant learning rate, and gradient clipping by global norm."""

    lr: float = Field(2e-5, gt=0)
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = Field(0.01, ge=0)
    eps: float = Field(1e-8, gt=0)
    warmup_steps: int = Field(0, ge=0)
    grad_clip: float | None = Field(1.0, gt=0, description="max global grad norm; null: no clipping")


class CheckpointConfig(Section):
    """Sharded torch distributed checkpoints through Ray Train: committed when every worker has written
    its part, the newest ``keep`` retained."""

    every: int = Field(1000, ge=1, description="steps between checkpoints (the last step always saves)")
    keep: int = Field(3, ge=1)


class ValidationConfig(Section):
    """Images generated with the model being trained, from fixed prompts and the identities of the first
    ``identities`` training samples (sorted by key): a visual check of progress."""

    every: int | None = Field(None, ge=1, description="steps between validations (null: never)")
    prompts: list[str] = Field(default_factory=lambda: ["a portrait photo of a person"])
    identities: int = Field(2, ge=1)
    num_steps: int = Field(4, ge=1)
    seed: int = 0


class TrainResources(Section):
    """Ray Train workers; never part of the step's identity (the global batch fixes the math)."""

    workers: int = Field(2, ge=1)
    use_gpu: bool = False
    cpus_per_worker: float = Field(1.0, gt=0)
    max_failures: int = Field(0, ge=-1, description="worker-group restarts from the last checkpoint")
    job: JobResources = JobResources()


class TrainConfig(Section):
    """Train the model family's trainable part on a frozen base: InfuseNet + the identity projection with
    conditional flow matching (InfU), or the Infinite-ID adapter with noise prediction."""

    init: ResolvedPath | None = Field(
        None,
        description="a checkpoint of the model family to start from (InfU: the released layout; "
        "Infinite-ID: an adapter folder); null: fresh from the base",
    )
    steps: int = Field(300_000, ge=1)
    global_batch: int = Field(512, ge=1, description="samples per optimiser step over all workers")
    seed: int = Field(0, description="noise, timesteps and dropout: with the step and worker, every draw")
    guidance_scale: float = Field(3.5, ge=0, description="the base's guidance input (FLUX.1-dev has one)")
    infusenet_guidance_scale: float = Field(1.0, ge=0)
    data: DataConfig = DataConfig()
    timesteps: TimestepConfig = TimestepConfig()
    optimizer: OptimizerConfig = OptimizerConfig()
    fsdp: bool = Field(True, description="FSDP2: shard every transformer block of the base and InfuseNet")
    param_dtype: Literal["float32", "bfloat16"] = Field(
        "float32", description="compute dtype of the models (bfloat16 on GPUs; master weights stay fp32)"
    )
    activation_checkpointing: bool = False
    checkpoint: CheckpointConfig = CheckpointConfig()
    log_every: int = Field(10, ge=1, description="steps between log lines and TensorBoard points")
    validation: ValidationConfig = ValidationConfig()
    plan: PlanConfig = PlanConfig()
    resources: TrainResources = TrainResources()

    @model_validator(mode="after")
    def _micro_batches_fill_the_global_batch(self) -> TrainConfig:
        self.accumulation_steps()
        return self

    @model_validator(mode="after")
    def _several_workers_shard(self) -> TrainConfig:
        if not self.fsdp and self.resources.workers > 1:
            raise ValueError(
                f"fsdp is false with resources.workers {self.resources.workers}: the workers would each "
                "train their own copy (no gradient is shared); set fsdp: true or resources.workers: 1"
            )
        return self

    def accumulation_steps(self, workers: int | None = None) -> int:
        """Micro batches per worker per optimiser step: ``global_batch / (micro_batch * workers)``."""
        return accumulation_steps(
            self.global_batch,
            self.data.micro_batch,
            workers or self.resources.workers,
            micro_batch_name="data.micro_batch",
            workers_name="resources.workers",
        )


class PairTrainConfig(TrainConfig):
    """The ``stage2:`` section, SFT on SPMS pairs: a sample's target is the synthetic image, its caption
    the pair's prompt and its identity the pair's real reference, so ``data.reference`` and
    ``data.mixture`` (stage 1's) must stay unset."""

    init: ResolvedPath | None = Field(
        None,
        description="InfU checkpoint (released layout) to start from; null: the export of this run's stage 1",
    )

    @model_validator(mode="after")
    def _pairs_bring_their_caption_and_reference(self) -> PairTrainConfig:
        if self.data.reference != "target":
            raise ValueError(
                f"data.reference is {self.data.reference!r}, but a pair's identity embedding is its real "
                "reference's (the row's reference_embedding): remove data.reference (a stage-1 setting)"
            )
        if self.data.mixture != MixtureConfig():
            raise ValueError(
                "data.mixture is set, but a pair's caption is the prompt its synthetic image was made "
                "from (the row's prompt): remove data.mixture (a stage-1 setting)"
            )
        return self


class PrecomputeConfig(Section):
    """The optional ``precompute:`` step: stage 1's frozen-encoder outputs (VAE latent distributions of
    each trainable sample's target and keypoint control, and the embeddings of its captions) cached once,
    so training reads them instead of decoding images and running the VAE and text encoders.

    An entry is used only when its image bytes, size and encoders match the sample trained; so
    ``max_side`` and ``param_dtype`` must equal ``stage1``'s (``data.max_side``, ``param_dtype``). At
    FLUX.1-dev scale an entry's latents take about 4 MiB per 1024^2 sample (fp32 mean + log-variance,
    2 MiB each for target and control) and each caption 8 MiB (512 T5 tokens x 4096, fp32): text is off
    by default."""

    max_side: int | None = Field(
        None,
        ge=LATENT_PIXEL_MULTIPLE,
        multiple_of=LATENT_PIXEL_MULTIPLE,
        description="the buckets scaled down to this longer side, as stage1.data.max_side",
    )
    latents: bool = Field(True, description="cache the target's and the control's latent distributions")
    text: bool = Field(False, description="cache the embeddings of every caption of each sample")
    param_dtype: Literal["float32", "bfloat16"] = Field("float32", description="as stage1.param_dtype")
    resources: Resources = Resources()

    @model_validator(mode="after")
    def _caches_something(self) -> PrecomputeConfig:
        if not (self.latents or self.text):
            raise ValueError("latents and text are both false: the step would cache nothing")
        return self
