"""The SPSS data path steps, registered in pyproject.toml under the ``infu.steps`` entry points."""

from filtering.config import FilterConfig, IngestConfig
from infu.steps import StepSpec

INGEST = StepSpec(
    name="ingest",
    package="filtering",
    section="ingest",
    section_model=IngestConfig,
    run="filtering.ingest:run_ingest",
    help="Source (image folder, webdataset tars, dataset layouts) -> raw shards, one record per input file.",
)

FILTER = StepSpec(
    name="filter",
    package="filtering",
    section="filter",
    section_model=FilterConfig,
    run="filtering.filter:run_filter",
    upstream=("ingest",),
    shared=("face", "quality"),
    input_field="input",
    help="Raw shards -> SPSS shards: face, quality, safety, bucket, dedup and identity-guard decisions.",
)
