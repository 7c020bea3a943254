"""The caption mixture training samples from (acceptance: frequencies, dropout, availability,
reproducibility, config errors) and the captions Parquet round trip."""

from __future__ import annotations

import json
from collections import Counter

import pyarrow.parquet as pq
import pytest
from pydantic import ValidationError

from infu.captions import (
    CAPTION_SCHEMA,
    CAPTION_SOURCES,
    CaptionMixture,
    MixtureConfig,
    captions_to_table,
    read_caption_rows,
    read_captions,
)
from infu.draws import weighted_index
from infu.shards import shard_name, stats_path

DRAWS = 10_000
WEIGHTS = {"original": 1.0, "attribute": 2.0, "small": 1.0, "blip2": 0.0, "internvl2": 4.0}
EVERY_SOURCE = {source: f"{source} caption" for source in CAPTION_SOURCES}


def shares(mixture: CaptionMixture, captions: dict[str, str | None], epoch: int = 0) -> Counter[str | None]:
    """Share of each picked source (None: the empty caption) over DRAWS distinct sample keys."""
    picks = Counter(mixture.pick(f"sample-{index}", epoch, captions)[0] for index in range(DRAWS))
    return Counter({source: count / DRAWS for source, count in picks.items()})


def test_source_frequencies_follow_the_weights_and_empty_rate():
    mixture = CaptionMixture(MixtureConfig(weights=WEIGHTS, empty_rate=0.1, seed=7))
    found = shares(mixture, EVERY_SOURCE)
    assert found[None] == pytest.approx(0.1, abs=0.02)
    total = sum(WEIGHTS.values())
    for source, weight in WEIGHTS.items():
        assert found[source] / (1 - found[None]) == pytest.approx(weight / total, abs=0.02), source
    assert found["blip2"] == 0


def test_the_text_comes_with_its_source():
    mixture = CaptionMixture(MixtureConfig(weights=WEIGHTS, empty_rate=0.3))
    picks = [mixture.pick(f"sample-{index}", 0, EVERY_SOURCE) for index in range(200)]
    assert {(source, text) for source, text in picks} == {
        (None, ""),
        *((source, EVERY_SOURCE[source]) for source in ("original", "attribute", "small", "internvl2")),
    }


def test_unavailable_sources_are_skipped_and_weights_renormalised():
    mixture = CaptionMixture(MixtureConfig(weights=WEIGHTS, empty_rate=0.0))
    captions = {"original": "a woman", "attribute": "a photo of a woman", "small": "  ", "internvl2": None}
    captions["blip2"] = "never picked: weight 0"
    found = shares(mixture, captions)
    assert set(found) == {"original", "attribute"}
    assert found["original"] == pytest.approx(1 / 3, abs=0.02)
    assert found["attribute"] == pytest.approx(2 / 3, abs=0.02)


def test_a_sample_without_weighted_text_gets_the_empty_caption():
    mixture = CaptionMixture(MixtureConfig(weights={"small": 1.0}, empty_rate=0.0))
    assert mixture.pick("sample-0", 0, {"original": "a woman", "small": None}) == (None, "")
    assert mixture.pick("sample-0", 0, {}) == (None, "")


def test_draws_are_reproducible_per_key_and_epoch_and_change_across_epochs():
    config = MixtureConfig(weights=WEIGHTS, empty_rate=0.1, seed=3)
    keys = [f"sample-{index}" for index in range(500)]
    first = [CaptionMixture(config).pick(key, 2, EVERY_SOURCE) for key in keys]
    again = CaptionMixture(config.model_copy())
    assert [again.pick(key, 2, EVERY_SOURCE) for key in reversed(keys)] == first[::-1]
    next_epoch = [again.pick(key, 3, EVERY_SOURCE) for key in keys]
    assert sum(a != b for a, b in zip(first, next_epoch, strict=True)) > 100
    other_seed = CaptionMixture(MixtureConfig(weights=WEIGHTS, empty_rate=0.1, seed=4))
    assert [other_seed.pick(key, 2, EVERY_SOURCE) for key in keys] != first


def test_draws_are_the_same_in_every_process():
    """Pinned picks: the draws hash (seed, key, epoch) with BLAKE2b, never Python's per-process hash."""
    mixture = CaptionMixture(MixtureConfig(weights=WEIGHTS, empty_rate=0.1, seed=0))
    picks = [mixture.pick(f"sample-{index}", 0, EVERY_SOURCE)[0] for index in range(8)]
    assert picks == [
        "attribute",
        "internvl2",
        "internvl2",
        "attribute",
        "internvl2",
        "internvl2",
        "internvl2",
        None,
    ]


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"weights": {"original": 1.0, "gpt4": 1.0}}, "unknown caption source \\['gpt4'\\]"),
        ({"weights": {"original": 1.0, "small": -0.5}}, "negative weight \\{'small': -0.5\\}"),
        ({"weights": {"original": 0.0, "small": 0.0}}, "every weight is zero"),
        ({"weights": {}}, "every weight is zero"),
        ({"empty_rate": 1.0}, "empty_rate"),
        ({"empty_rate": -0.1}, "empty_rate"),
        ({"seeds": 1}, "seeds"),
    ],
)
def test_config_errors_are_named(settings, message):
    with pytest.raises(ValidationError, match=message):
        MixtureConfig(**settings)


ROWS = [
    {
        "key": "celeba-1",
        "dataset": "celeba",
        "shard": "000000",
        "original": None,
        "attribute": "a photo of a smiling woman",
        "small": None,
        "blip2": "a woman smiling",
        "internvl2": None,
        "flags": {"small": ["multiple_people"], "blip2": ["over_clip"]},
    },
    {
        "key": "ffhq-2",
        "dataset": "ffhq",
        "shard": "000000",
        "original": None,
        "attribute": "a close-up photo of a man",
        "small": None,
        "blip2": None,
        "internvl2": None,
        "flags": {},
    },
]


def test_caption_rows_round_trip_through_parquet(tmp_path):
    sparse = {"key": "ffhq-2", "dataset": "ffhq", "shard": "000000", "attribute": "a close-up photo of a man"}
    table = captions_to_table([ROWS[0], sparse])
    assert table.schema == CAPTION_SCHEMA
    assert table.schema.metadata == {b"infu_caption_schema_version": b"1"}
    assert table.column_names == ["key", "dataset", "shard", *CAPTION_SOURCES, "flags"]
    path = tmp_path / "000000.parquet"
    pq.write_table(table, path)
    assert read_caption_rows(path) == ROWS


def test_unknown_columns_are_an_error():
    with pytest.raises(KeyError, match=r"unknown columns \['gpt4'\]"):
        captions_to_table([dict(ROWS[0], gpt4="a caption")])


def write_shard(out_dir, index, rows, committed=True):
    name = shard_name(index)
    pq.write_table(captions_to_table([dict(row, shard=name) for row in rows]), out_dir / f"{name}.parquet")
    if committed:
        stats_path(out_dir, name).write_text(json.dumps({"shard": name}))


def test_read_captions_reads_the_committed_shards_by_key(tmp_path):
    write_shard(tmp_path, 0, ROWS[:1])
    write_shard(tmp_path, 1, ROWS[1:])
    write_shard(tmp_path, 2, [dict(ROWS[0], key="uncommitted-3")], committed=False)
    captions = read_captions(tmp_path)
    assert list(captions) == ["celeba-1", "ffhq-2"]
    assert captions["ffhq-2"] == dict(ROWS[1], shard="000001")
    write_shard(tmp_path, 3, ROWS[:1])
    with pytest.raises(ValueError, match="sample celeba-1 is in shards 000000 and 000003"):
        read_captions(tmp_path)


def test_a_weighted_index_follows_the_weights_and_only_its_parts():
    draws = [weighted_index([1, 0, 3], "seed", key) for key in range(4000)]
    assert draws == [weighted_index([1, 0, 3], "seed", key) for key in range(4000)]
    assert 1 not in draws
    assert abs(draws.count(2) / len(draws) - 0.75) < 0.03
