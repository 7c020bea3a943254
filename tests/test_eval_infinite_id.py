"""The evaluation steps for model.family infinite_id: a tiny Infinite-ID adapter (never trained) and its
ablations (inference switches changed) on the sample corpus's people plus a photo without a face,
scored with the dlib face stack and the tiny CLIP models, beside the Infinite-ID paper's rows."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from PIL import Image

from eval.benchmark import sample_corpus_identities
from eval.generate import GenerateStage, benchmark_pairs, benchmark_tasks, run_benchmark
from eval.report import PAPER_RESULTS
from eval.score import REPORT_DIR, run_eval
from infu.config import ConfigError, load_config
from infu.face.recognizer import EMBEDDING_DIMS
from infu.identities import IDENTITY_MANIFEST
from infu.model.infinite_id import InfiniteIdPipeline
from infu.records import RejectReason
from infu.sample_corpus import ensure_sample_corpus
from infu.shards import TarReader
from infu.steps import StepError

from .conftest import EMBEDDED, INFINITE_ID_EMBEDDED, ray_unless_running

ADAPTER_SEED = 1
"""The tiny adapter's seed (the config's tiny SDXL is seed 0's)."""
ABLATIONS = {
    "tiny-mutual": {"model": "tiny", "mode": "mutual"},
    "tiny-adain": {"model": "tiny", "adain": "full"},
    "tiny-plain": {"model": "tiny", "mode": "plain", "adain": None},
}
VERSIONS = ["tiny", *ABLATIONS]
PAIRS = 15
"""3 men and 4 women x (their first prompt + the `any` one), and the faceless photo x the `any` one."""


def write_identities(folder: Path, corpus: Path) -> Path:
    """An identity folder: the sample corpus's people and ``faceless``, a grey photo without a face."""
    folder.mkdir(parents=True)
    Image.new("RGB", (96, 128), (128, 128, 128)).save(folder / "faceless.png")
    entries = [
        {"name": identity.name, "gender": identity.gender, "photo": str(identity.photo)}
        for identity in sample_corpus_identities(corpus)
    ]
    entries.append({"name": "faceless", "photo": "faceless.png"})
    (folder / IDENTITY_MANIFEST).write_text(yaml.safe_dump({"identities": entries}))
    return folder


def tiny_adapter(folder: Path) -> Path:
    """A tiny adapter whose face mapper takes the dlib stack's descriptors, saved without training."""
    pipeline = InfiniteIdPipeline.tiny(ADAPTER_SEED, arcface_dim=EMBEDDING_DIMS["dlib"])
    pipeline.adapter.save_pretrained(folder)
    return folder


def overrides(root: Path, adapter: Path, ablations: dict = ABLATIONS) -> list[str]:
    return [
        f"run.run_dir={root / 'run'}",
        f"benchmark.identities={root / 'identities'}",
        "benchmark.identity_source=manifest",
        "benchmark.prompts_per_tag=1",
        "benchmark.models=[]",
        f"benchmark.checkpoints={{tiny: {adapter}}}",
        f"benchmark.ablations={json.dumps(ablations)}",
    ]


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    """``(config, benchmark manifest, eval manifest)`` of one run over the tiny adapter and its ablations."""
    root = tmp_path_factory.mktemp("infinite_id_eval")
    write_identities(root / "identities", ensure_sample_corpus(root / "corpus"))
    # FID and LPIPS diversity (half the scoring time) are test_eval_steps' and family-independent
    skipped = ["eval.fid=false", "eval.lpips=null"]
    config = load_config(INFINITE_ID_EMBEDDED, overrides(root, tiny_adapter(root / "adapter")) + skipped)
    with ray_unless_running():
        return config, run_benchmark(config), run_eval(config)


def scores(config) -> list[dict]:
    return pq.read_table(config.step_dir("eval") / REPORT_DIR / "scores.parquet").to_pylist()


def image_of(config, row: dict) -> bytes:
    return TarReader(config.step_dir("benchmark") / f"{row['shard']}.tar").read(f"{row['key']}.png")


def test_every_pair_is_a_row_of_the_model_and_of_each_ablation(evaluated):
    config, benchmark, _ = evaluated
    assert benchmark["benchmark"]["pairs"] == PAIRS
    assert benchmark["models"] == VERSIONS
    paper = {"mode": "mixed", "adain": "mean", "identity_scale": 1.0}
    assert benchmark["ablations"] == {name: {**paper, **ablation} for name, ablation in ABLATIONS.items()}
    rows = scores(config)
    assert {version: sum(row["model"] == version for row in rows) for version in VERSIONS} == dict.fromkeys(
        VERSIONS, PAIRS
    )
    assert {row["source"] for row in rows if row["model"] in ABLATIONS} == {"ablation"}
    rejected = [row for row in rows if row["status"] == "rejected"]
    assert sorted(row["model"] for row in rejected) == sorted(VERSIONS), "the faceless photo, once each"
    assert {(row["identity"], row["reject_reason"]) for row in rejected} == {
        ("faceless", RejectReason.NO_FACE)
    }


def test_images_are_pngs_of_the_configured_size(evaluated):
    config, _, _ = evaluated
    made = [row for row in scores(config) if row["status"] == "ok"]
    assert len(made) == len(VERSIONS) * (PAIRS - 1)
    for row in made:
        image = Image.open(io.BytesIO(image_of(config, row)))
        assert (image.format, image.size) == ("PNG", (96, 128))


def test_each_ablation_changes_the_images_of_the_same_pair_and_seed(evaluated):
    config, _, _ = evaluated
    rows = [row for row in scores(config) if row["status"] == "ok"]
    base = {(row["identity"], row["prompt_id"], row["seed"]): row for row in rows if row["model"] == "tiny"}
    for ablation in ABLATIONS:
        ablated = [row for row in rows if row["model"] == ablation]
        assert len(ablated) == len(base) == PAIRS - 1
        for row in ablated:
            same = base[(row["identity"], row["prompt_id"], row["seed"])]
            pixels = np.asarray(Image.open(io.BytesIO(image_of(config, row))), dtype=np.int16)
            base_pixels = np.asarray(Image.open(io.BytesIO(image_of(config, same))), dtype=np.int16)
            assert np.abs(pixels - base_pixels).max() > 0, (ablation, row["identity"], row["prompt_id"])


def test_a_version_regenerated_makes_the_same_images(evaluated):
    config, _, _ = evaluated
    _, _, pair_list = benchmark_pairs(config.benchmark)
    stored = {row["key"]: row for row in scores(config)}
    stage = GenerateStage(config.model, config.face, "cpu")
    stage.setup()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the step's worker (1 CPU): sums split across threads round differently
    try:
        for task in benchmark_tasks(config.benchmark, {}, pair_list):
            row = next(row for row in task.ref["rows"] if row["identity"] != "faceless")
            made = stage.make(row, task.ref["checkpoint"], task.ref["switches"])
            assert made.image == image_of(config, stored[row["key"]]), task.name
    finally:
        torch.set_num_threads(threads)


def test_the_summary_and_report_have_every_version_and_the_paper_rows(evaluated):
    config, _, manifest = evaluated
    folder = config.step_dir("eval") / REPORT_DIR
    summary = json.loads((folder / "summary.json").read_text())
    assert manifest["summary"] == summary and sorted(summary["models"]) == sorted(VERSIONS)
    for version, numbers in summary["models"].items():
        assert (numbers["images"], numbers["scored"]) == (PAIRS, PAIRS - 1), version
        # face similarity counts the faceless photo's row too, at its worst value
        for metric, count in (("clip_t", PAIRS - 1), ("clip_i", PAIRS - 1), ("face_similarity", PAIRS)):
            interval = numbers["metrics"][metric]
            assert math.isfinite(interval["mean"]) and interval["count"] == count, (version, metric)
    markdown = (folder / "report.md").read_text()
    assert all(f"| {version} |" in markdown for version in VERSIONS)
    for paper, numbers in (
        ("Infinite-ID (paper)", ["0.340", "0.913", "0.689"]),
        ("Infinite-ID w/o identity-enhanced training (paper)", ["0.329", "0.891", "0.593"]),
        ("Infinite-ID mutual attention (paper)", ["0.316", "0.808", "0.398"]),
    ):
        assert paper in PAPER_RESULTS
        line = next(line for line in markdown.splitlines() if line.startswith(f"| {paper} |"))
        assert [cell.strip() for cell in line.strip("|").split("|")][4:] == numbers


@pytest.fixture
def adapter(tmp_path) -> Path:
    """An adapter folder the checks below refuse before anything opens it."""
    return tmp_path / "adapter"


@pytest.mark.parametrize(
    ("ablations", "message"),
    [
        ({"bad name": {"model": "tiny"}}, "must match"),
        ({"tiny": {"model": "tiny", "mode": "mutual"}}, r"repeat across .*ablations: \['tiny'\]"),
        ({"mutual": {"model": "stage1", "mode": "mutual"}}, r"ablations \{'mutual': 'stage1'\}: their model"),
        ({"plain": {"model": "tiny", "mode": "plain", "adain": "mean"}}, "use mode mixed or mutual"),
        ({"unset": {"model": "tiny", "mode": None}}, "Input should be 'plain', 'mixed' or 'mutual'"),
        ({"plain-mean": {"model": "tiny", "mode": "plain"}}, "use mode mixed or mutual"),  # adain: mean
        ({"weak": {"model": "tiny", "identity_scale": -1}}, "greater than or equal to 0"),
    ],
)
def test_invalid_ablations_are_config_errors(tmp_path, adapter, ablations, message):
    with pytest.raises(ConfigError, match=message):
        load_config(INFINITE_ID_EMBEDDED, overrides(tmp_path, adapter, ablations))


def test_an_ablation_is_the_paper_inference_with_the_switches_it_sets(tmp_path, adapter):
    config = load_config(INFINITE_ID_EMBEDDED, overrides(tmp_path, adapter))
    ablations = config.benchmark.ablations
    assert ablations["tiny-mutual"].switches() == {"mode": "mutual", "adain": "mean", "identity_scale": 1.0}
    assert ablations["tiny-plain"].switches() == {"mode": "plain", "adain": None, "identity_scale": 1.0}


def test_ablations_need_the_infinite_id_family_before_anything_is_written(tmp_path, adapter):
    config = load_config(EMBEDDED, overrides(tmp_path, adapter))
    assert config.model.family == "infu"
    with pytest.raises(StepError, match=r"benchmark\.ablations .* need model\.family infinite_id"):
        run_benchmark(config)
    assert not config.run.run_dir.exists() and not config.benchmark.identities.exists()
