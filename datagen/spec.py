"""The SPMS steps, registered in pyproject.toml under the ``infu.steps`` entry points."""

from datagen.config import SpmsConfig, SynthConfig
from infu.steps import StepSpec

SYNTH = StepSpec(
    name="synth",
    package="datagen",
    section="synth",
    section_model=SynthConfig,
    run="datagen.synth:run_synth",
    upstream=("filter", "stage1"),
    shared=("model", "face"),
    help="SPMS synthesis: new images of each kept portrait's person from the stage-1 model, face-swapped.",
)
SPMS = StepSpec(
    name="spms",
    package="datagen",
    section="spms",
    section_model=SpmsConfig,
    run="datagen.spms_filter:run_spms",
    upstream=("synth",),
    shared=("face", "quality"),
    input_field="input",
    command="filter",
    help="The SPMS filter: identity similarity, pose, aesthetics, one face, NSFW and copy-paste -> pairs.",
)
