"""The training steps, registered in pyproject.toml under the ``infu.steps`` entry points."""

from infu.steps import StepSpec
from training.config import TrainConfig

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
