"""The evaluation steps, registered in pyproject.toml under the ``infu.steps`` entry points."""

from eval.config import BenchmarkConfig, EvalConfig
from infu.steps import StepSpec

BENCHMARK = StepSpec(
    name="benchmark",
    package="eval",
    section="benchmark",
    section_model=BenchmarkConfig,
    run="eval.generate:run_benchmark",
    upstream=("stage1", "stage2"),
    shared=("model", "face"),
    command="generate",
    help="The benchmark's images: every identity with every prompt of its gender, for each model version.",
)
EVAL = StepSpec(
    name="eval",
    package="eval",
    section="eval",
    section_model=EvalConfig,
    run="eval.score:run_eval",
    upstream=("benchmark",),
    shared=("face",),
    command="score",
    help="Scores (ID Loss, CLIPScore, PickScore, CLIP-T/I, face similarity, FID, LPIPS) and the report.",
)
