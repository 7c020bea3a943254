"""The evaluation steps end to end on the sample corpus's people: the benchmark's images from a tiny InfU
checkpoint and from two baselines made of real photos (each person's own photo, and another person's),
scored with the dlib face stack and the tiny CLIP models, aggregated and reported."""

from __future__ import annotations

import io
import json
import math
from html.parser import HTMLParser
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
import yaml
from PIL import Image
from typer.testing import CliRunner

from eval.benchmark import Benchmark, sample_corpus_identities
from eval.cli import app
from eval.generate import run_benchmark
from eval.metrics import NO_FACE_ID_LOSS, ClipScorer
from eval.score import REPORT_DIR, run_eval
from infu.config import load_config
from infu.model.factory import build_pipeline, load_infu
from infu.records import RejectReason
from infu.sample_corpus import ensure_sample_corpus
from infu.shards import TarReader

from .conftest import EMBEDDED, ray_unless_running

pytestmark = pytest.mark.filterwarnings("ignore:.*FluxPosEmbed:FutureWarning")

PROMPTS_PER_TAG = 1


def write_baseline(folder: Path, identities, pick) -> Path:
    """A baseline placing, for every pair of the one-prompt-per-tag benchmark, the photo of ``pick(i)``
    (but the first pair's: that image is missing)."""
    benchmark = Benchmark.load()
    entries = []
    for position, identity in enumerate(identities):
        prompts = [p for p in benchmark.prompts if p.gender in {identity.gender, "any"}]
        tags = {}
        for prompt in prompts:  # the first prompt of each tag, as prompts_per_tag: 1 keeps
            tags.setdefault(prompt.gender, prompt)
        for prompt in tags.values():
            entries.append(
                {"identity": identity.name, "prompt": prompt.text, "image": pick(position).photo.name}
            )
    entries = entries[1:]
    folder.mkdir(parents=True)
    for identity in identities:
        (folder / identity.photo.name).write_bytes(identity.photo.read_bytes())
    mapping = folder / "mapping.yaml"
    mapping.write_text(yaml.safe_dump(entries))
    return mapping


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    """``(config, benchmark manifest, eval manifest)`` of one run over a tiny checkpoint and two baselines."""
    root = tmp_path_factory.mktemp("eval")
    corpus = ensure_sample_corpus(root / "corpus")
    identities = sample_corpus_identities(corpus)
    config = load_config(EMBEDDED, [f"run.run_dir={root / 'run'}"])
    checkpoint = root / "tiny_infu"
    load_infu(config.model, build_pipeline(config.model).transformer, torch.float32).save_pretrained(
        checkpoint
    )
    own = write_baseline(root / "own", identities, lambda position: identities[position])
    other = write_baseline(
        root / "other", identities, lambda position: identities[(position + 3) % len(identities)]
    )
    overrides = [
        f"run.run_dir={root / 'run'}",
        f"benchmark.identities={corpus}",
        f"benchmark.prompts_per_tag={PROMPTS_PER_TAG}",
        "benchmark.models=[]",
        f"benchmark.checkpoints={{tiny: {checkpoint}}}",
        f"benchmark.baselines={{own: {{images: {root / 'own'}, mapping: {own}}}, "
        f"other: {{images: {root / 'other'}, mapping: {other}}}}}",
        "benchmark.pairs_per_shard=8",
    ]
    config = load_config(EMBEDDED, overrides)
    with ray_unless_running():
        return config, run_benchmark(config), run_eval(config)


def scores(config) -> list[dict]:
    return pq.read_table(config.step_dir("eval") / REPORT_DIR / "scores.parquet").to_pylist()


def test_every_identity_meets_every_prompt_of_its_gender_once_per_model(evaluated):
    config, benchmark, _ = evaluated
    identities = sample_corpus_identities(config.benchmark.identities)
    expected = sum(2 if identity.gender in ("man", "woman") else 1 for identity in identities)
    assert benchmark["benchmark"]["pairs"] == expected == 14, (
        "3 men and 4 women x (their prompt + the any one)"
    )
    rows = scores(config)
    assert {model: sum(row["model"] == model for row in rows) for model in ("tiny", "own", "other")} == {
        "tiny": 14,
        "own": 14,
        "other": 14,
    }


def test_id_loss_is_zero_for_the_person_own_photo_and_clearly_higher_for_another_person(evaluated):
    config, _, _ = evaluated
    rows = [row for row in scores(config) if row["status"] == "ok"]
    own = [row for row in rows if row["model"] == "own"]
    other = [row for row in rows if row["model"] == "other"]
    assert own and all(row["id_loss"] < 1e-6 and row["faces"] == 1 for row in own)
    assert all(row["clip_i"] == pytest.approx(1.0, abs=1e-5) for row in own), "the same face crop"
    assert min(row["id_loss"] for row in other) > 0.05
    missing = [row for row in scores(config) if row["status"] == "rejected"]
    assert {(row["model"], row["reject_reason"]) for row in missing} == {
        ("own", RejectReason.MISSING_IMAGE),
        ("other", RejectReason.MISSING_IMAGE),
    }
    assert all(row["id_loss"] == NO_FACE_ID_LOSS and row["clip_score"] is None for row in missing)


def test_the_model_images_are_scored_with_the_configured_clip(evaluated):
    config, _, _ = evaluated
    row = next(row for row in scores(config) if row["model"] == "tiny")
    tar = TarReader(config.step_dir("benchmark") / f"{row['shard']}.tar")
    image = Image.open(io.BytesIO(tar.read(f"{row['key']}.png")))
    assert image.size == (96, 128)
    expected = ClipScorer.tiny(0).score([image.convert("RGB")], [row["prompt"]])[0]
    assert row["clip_score"] == pytest.approx(float(expected), abs=1e-5)
    assert row["faces"] == 0 and row["id_loss"] == NO_FACE_ID_LOSS, "the tiny random model draws no face"


class _MeanCells(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.means: dict[tuple[str, str], float] = {}
        self.model = ""

    def handle_starttag(self, tag, attrs):
        values = dict(attrs)
        if tag == "tr" and "data-model" in values:
            self.model = values["data-model"]
        if tag == "td" and "data-mean" in values:
            self.means[(self.model, values["data-metric"])] = float(values["data-mean"])


def test_the_report_shows_every_model_with_the_summary_numbers(evaluated):
    config, _, manifest = evaluated
    folder = config.step_dir("eval") / REPORT_DIR
    summary = json.loads((folder / "summary.json").read_text())
    assert manifest["summary"] == summary and list(summary["models"]) == ["other", "own", "tiny"]
    own = summary["models"]["own"]
    assert own["images"] == 14 and own["scored"] == 13 and own["metrics"]["id_loss"]["count"] == 14
    interval = own["metrics"]["id_loss"]
    assert interval["low"] <= interval["mean"] <= interval["high"]
    assert interval["mean"] == pytest.approx(NO_FACE_ID_LOSS / 14, abs=1e-6), "13 at 0, the missing one at 2"
    assert math.isfinite(summary["models"]["tiny"]["lpips_diversity"])
    parser = _MeanCells()
    parser.feed((folder / "report.html").read_text())
    for model, numbers in summary["models"].items():
        for metric, values in numbers["metrics"].items():
            if (model, metric) in parser.means:
                assert parser.means[(model, metric)] == pytest.approx(values["mean"])
    assert ("own", "id_loss") in parser.means
    assert (folder / "gallery" / "other_id_loss.png").is_file()
    printed = CliRunner().invoke(
        app, ["report", "--config", str(EMBEDDED), "--set", f"run.run_dir={config.run.run_dir}"]
    )
    assert printed.exit_code == 0 and "| own |" in printed.output and "report.html" in printed.output
