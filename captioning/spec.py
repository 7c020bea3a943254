"""The caption step, registered in pyproject.toml under the ``infu.steps`` entry points."""

from captioning.config import CaptionConfig
from infu.steps import StepSpec

CAPTION = StepSpec(
    name="caption",
    package="captioning",
    section="caption",
    section_model=CaptionConfig,
    run="captioning.caption:run_caption",
    upstream=("filter",),
    input_field="input",
    help="Filter output (kept samples) -> a captions Parquet per shard: dataset, attribute and model text.",
)
