"""The training steps, registered in pyproject.toml under the ``infu.steps`` entry points."""

from infu.steps import StepSpec
from training.config import PairTrainConfig, TrainConfig

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
