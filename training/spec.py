"""The training steps, registered in pyproject.toml under the ``infu.steps`` entry points."""

from infu.steps import StepSpec
from training.config import PairTrainConfig, PrecomputeConfig, TrainConfig

STAGE1 = StepSpec(
    name="stage1",
    package="training",
    section="stage1",
    section_model=TrainConfig,
    run="training.train:run_stage1",
    upstream=("filter", "caption"),
    shared=("model",),
    help="Stage-1 pretraining on SPSS: InfuseNet + projection with flow matching on Ray Train (FSDP2).",
)
STAGE2 = StepSpec(
    name="stage2",
    package="training",
    section="stage2",
    section_model=PairTrainConfig,
    run="training.train:run_stage2",
    upstream=("stage1", "spms"),
    shared=("model",),
    help="Stage-2 SFT on SPMS pairs: the stage-1 export trained on synthetic images of real references.",
)
PRECOMPUTE = StepSpec(
    name="precompute",
    package="training",
    section="precompute",
    section_model=PrecomputeConfig,
    run="training.precompute:run_precompute",
    upstream=("filter", "caption"),
    shared=("model",),
    feeds=("stage1",),
    help="Optional: stage 1's VAE latents and caption embeddings, cached once for training to read.",
)
