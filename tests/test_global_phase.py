"""The scalable global phase: equal to the driver-side reference on small data, independent of the shard
layout and of Ray, per-shard decision files, and recall on planted duplicates and identities."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from filtering import global_phase
from filtering.config import FilterThresholds
from filtering.dedup import find_duplicates
from filtering.global_phase import (
    DECISION_SCHEMA,
    DECISIONS,
    StreamingComponents,
    compute_global_decisions,
    merge_on_disk,
    split_large_components,
    write_inverted_lists,
)
from filtering.identity import cluster_identities
from infu.raycluster import start_local_ray
from infu.records import RejectReason, Status, new_record
from infu.shards import ShardWriter

RULES = FilterThresholds(max_phash_distance=4, same_identity_similarity=0.4)


def _unit(vectors: np.ndarray) -> np.ndarray:
    return vectors / np.linalg.norm(vectors, axis=-1, keepdims=True)


def synthetic_records(count: int, seed: int, dimension: int = 64) -> tuple[list[dict], dict[str, int]]:
    """Records of three datasets: identities (cosine ~0.5-0.7 within, ~0 between), exact and near
    duplicates, chains through missing pHashes, rejected rows and rows without face. Also returns the
    identity of each face's key."""
    rng = np.random.default_rng(seed)
    datasets = rng.choice(["alpha", "beta", "gamma"], size=count, p=[0.5, 0.3, 0.2])
    people = rng.integers(0, max(1, count // 12), size=count)
    centres = _unit(rng.normal(size=(people.max() + 1, dimension)))
    noise = rng.uniform(0.65, 1.0, size=(count, 1)) * _unit(rng.normal(size=(count, dimension)))
    faces = _unit(centres[people] + noise)
    hashes = rng.integers(-(2**63), 2**63 - 1, size=count, dtype=np.int64, endpoint=True)
    records, identities = [], {}
    for index in range(count):
        record = new_record(str(datasets[index]), f"images/{index}.jpg", sha256=f"sha-{index}")
        record.update(phash=int(hashes[index]), face_embedding=faces[index].tolist())
        kind = rng.random()
        if index > 10 and kind < 0.05:  # exact copy of an earlier image
            source = records[rng.integers(0, index)]
            record.update(sha256=source["sha256"], phash=source["phash"])
        elif index > 10 and kind < 0.12:  # near copy: a few bits flipped
            source = records[rng.integers(0, index)]
            if source["phash"] is not None:
                flips = rng.choice(64, rng.integers(0, 5), replace=False)
                record["phash"] = flip_bits(source["phash"], flips)
        elif kind < 0.16:
            record["phash"] = None
        elif kind < 0.18:
            record["sha256"] = None
        if rng.random() < 0.1:
            record["face_embedding"] = None
        if rng.random() < 0.1:
            record.update(status=Status.REJECTED.value, reject_reason=RejectReason.BLUR.value)
        if record["face_embedding"] is not None:
            identities[record["key"]] = int(people[index])
        records.append(record)
    for chain in range(10):  # a has no pHash, b its bytes, c is near b: c chains to a when a comes first
        value = int(hashes[chain])
        for name, sha256, phash in (("a", "x", None), ("b", "x", value), ("c", "y", value ^ 1)):
            records.append(
                new_record("alpha", f"chain/{chain}/{name}.jpg", sha256=f"{sha256}{chain}", phash=phash)
            )
    return records, identities


def flip_bits(value: int, bits: np.ndarray) -> int:
    unsigned = np.array([value], dtype=np.int64).view(np.uint64)
    return int((unsigned ^ np.uint64(sum(1 << int(bit) for bit in bits))).view(np.int64)[0])


def write_scored(folder: Path, records: list[dict], shards: int, seed: int) -> Path:
    """The records spread over ``shards`` committed records-only shards in a random layout."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    placement = rng.integers(0, shards, size=len(records))
    for shard in range(shards):
        writer = ShardWriter(folder, f"{shard:06d}", extra_stats={}, with_images=False)
        for index in rng.permutation(np.flatnonzero(placement == shard)):
            writer.add(records[index])
        writer.commit()
    return folder


def reference_decisions(records: list[dict], rules: FilterThresholds) -> dict[str, tuple]:
    """The former driver-side phase: everything in memory, rows sorted by key."""
    kept = sorted((record for record in records if record["status"] == Status.OK), key=lambda r: r["key"])
    keys = [record["key"] for record in kept]
    duplicates = find_duplicates(
        keys, [r["sha256"] for r in kept], [r["phash"] for r in kept], max_distance=rules.max_phash_distance
    )
    clusters = {}
    for dataset in sorted({record["dataset"] for record in kept}):
        part = [r for r in kept if r["dataset"] == dataset and r["face_embedding"] is not None]
        ids = cluster_identities(
            [r["key"] for r in part],
            np.array([r["face_embedding"] for r in part]),
            rules.same_identity_similarity,
            dataset=dataset,
        )
        clusters.update(zip([r["key"] for r in part], ids, strict=True))
    return {
        key: (
            RejectReason.DUPLICATE.value if key in duplicates else None,
            duplicates[key][0] if key in duplicates else None,
            clusters.get(key),
        )
        for key in sorted(set(duplicates) | set(clusters))
    }


def read_decisions(out: Path) -> dict[str, tuple]:
    table = pa.concat_tables(pq.read_table(path) for path in sorted((out / DECISIONS).glob("*.parquet")))
    return {
        row["key"]: (row["reject_reason"], row["reject_detail"], row["identity_cluster"])
        for row in table.to_pylist()
    }


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> tuple[list[dict], Path, Path]:
    records, _ = synthetic_records(3000, seed=1)
    root = tmp_path_factory.mktemp("global")
    scored = write_scored(root / "scored", records, shards=7, seed=2)
    out = root / "out"
    out.mkdir()
    stats = compute_global_decisions(scored, out, RULES)
    assert stats["identity_index"]["bits_per_dimension"] == 32  # exhaustive at this size
    return records, scored, out


def test_decisions_equal_the_driver_side_reference(small):
    records, _, out = small
    expected = reference_decisions(records, RULES)
    found = read_decisions(out)
    assert found == expected
    details = [detail for _, detail, _ in expected.values() if detail]
    assert {detail.split(" ")[0] for detail in details} == {"same", "phash", "near-duplicate"}
    assert len({cluster for *_, cluster in expected.values()}) > 100


def test_one_file_per_shard_with_only_its_keys(small):
    records, scored, out = small
    for path in sorted(scored.glob("*.parquet")):
        decisions = pq.read_table(out / DECISIONS / path.name)
        assert decisions.schema.equals(DECISION_SCHEMA)
        shard_keys = set(pq.read_table(path, columns=["key"])["key"].to_pylist())
        assert set(decisions["key"].to_pylist()) <= shard_keys
    assert sorted(path.name for path in (out / DECISIONS).iterdir()) == sorted(
        path.name for path in scored.glob("*.parquet")
    )
    assert not (out / global_phase.WORK).exists()


def test_another_shard_layout_gives_the_same_decisions(small, tmp_path, monkeypatch):
    """Also with rows streamed and decisions written in small batches (a few shards per query)."""
    records, _, out = small
    scored = write_scored(tmp_path / "scored", records, shards=3, seed=9)
    (tmp_path / "out").mkdir()
    monkeypatch.setattr(global_phase, "BATCH_ROWS", 500)
    compute_global_decisions(scored, tmp_path / "out", RULES)
    assert read_decisions(tmp_path / "out") == read_decisions(out)


def test_empty_shards_and_no_faces(tmp_path):
    records = [new_record("alpha", f"{index}.jpg", sha256="same", phash=index) for index in range(3)]
    scored = write_scored(tmp_path / "scored", records, shards=4, seed=0)
    (tmp_path / "out").mkdir()
    stats = compute_global_decisions(scored, tmp_path / "out", RULES)
    assert stats["faces"] == 0 and stats["exact_duplicates"] == 2
    assert len(list((tmp_path / "out" / DECISIONS).glob("*.parquet"))) == 4
    first = min(record["key"] for record in records)
    details = {detail for _, detail, _ in read_decisions(tmp_path / "out").values()}
    assert details == {f"same sha256 as {first}"}


@pytest.fixture(scope="module")
def planted(tmp_path_factory) -> tuple[list[dict], dict[str, int], Path]:
    """30k rows: large enough for the compressed index (more faces than EXHAUSTIVE_FACES) and for Ray
    (more kept rows than RAY_ROWS)."""
    records, identities = synthetic_records(30_000, seed=3, dimension=128)
    scored = write_scored(tmp_path_factory.mktemp("planted") / "scored", records, shards=10, seed=4)
    return records, identities, scored


@pytest.fixture(scope="module")
def planted_decisions(planted, tmp_path_factory) -> tuple[dict[str, Any], Path]:
    """The global phase over ``planted`` in this process (no Ray): its stats and output folder."""
    out = tmp_path_factory.mktemp("planted_local")
    return compute_global_decisions(planted[2], out, RULES), out


@pytest.mark.slow  # ~1-2 min on 2 cores: trains the compressed index
def test_planted_duplicates_and_identities_are_recovered(planted, planted_decisions):
    records, identities, _ = planted
    stats, out = planted_decisions
    assert (
        stats["identity_index"]["bits_per_dimension"] == 4 and stats["faces"] > global_phase.EXHAUSTIVE_FACES
    )
    found = read_decisions(out)
    expected = reference_decisions(records, RULES)
    expected_duplicates = {key for key, (reason, *_) in expected.items() if reason}
    found_duplicates = {key for key, (reason, *_) in found.items() if reason}
    assert found_duplicates == expected_duplicates  # the pHash search is exact at any size
    clusters = {key: cluster for key, (*_, cluster) in found.items()}
    recall, purity = pair_recall_and_purity(identities, clusters)
    assert recall >= 0.95 and purity >= 0.99


def pair_recall_and_purity(truth: dict[str, int], clusters: dict[str, str | None]) -> tuple[float, float]:
    """Same-identity pairs put in one cluster / all same-identity pairs; same-cluster pairs of one
    identity / all same-cluster pairs (per dataset clusters, so pairs across datasets never count)."""
    keys = [key for key in truth if clusters.get(key)]
    people = np.array([truth[key] for key in keys])
    _, cluster_ids = np.unique([clusters[key] for key in keys], return_inverse=True)
    datasets = np.unique([key.rsplit("-", 1)[0] for key in keys], return_inverse=True)[1]

    def pairs(*labels: np.ndarray) -> int:
        _, counts = np.unique(np.stack(labels, axis=1), axis=0, return_counts=True)
        return int((counts * (counts - 1) // 2).sum())

    together = pairs(people, cluster_ids)
    return together / pairs(people, datasets), together / pairs(cluster_ids)


@pytest.mark.slow  # starts Ray and runs the compressed path
def test_ray_gives_the_same_decisions(planted, planted_decisions, tmp_path):
    start_local_ray(num_cpus=2, include_dashboard=False)
    try:
        stats = compute_global_decisions(planted[2], tmp_path, RULES)
    finally:
        ray.shutdown()
    assert stats["faces"] > global_phase.EXHAUSTIVE_FACES and stats["kept_rows"] > global_phase.RAY_ROWS
    assert read_decisions(tmp_path) == read_decisions(planted_decisions[1])


@pytest.mark.parametrize("merge_edges", [1, 7, 10_000])
def test_streaming_components_equal_scipy_on_the_whole_graph(merge_edges):
    rng = np.random.default_rng(3)
    nodes, edges = 2_000, 1_500
    first, second = rng.integers(0, nodes, size=(2, edges))
    expected = connected_components(
        coo_matrix((np.ones(edges), (first, second)), shape=(nodes, nodes)), directed=False
    )[1]
    graph = StreamingComponents(nodes, merge_edges=merge_edges)
    for start in range(0, edges, 37):
        graph.add(first[start : start + 37], second[start : start + 37])
    assert graph.edges == edges
    np.testing.assert_array_equal(graph.components(), expected)


def test_large_components_split_along_groups_of_lists():
    """A component chaining three people (each on its own 20 IVF lists) beyond the cap is cut into the
    three people; a component under the cap and the face order of the numbering are kept."""
    rng = np.random.default_rng(5)
    people = rng.normal(size=(3, 64))
    centroids = np.concatenate([person + 0.1 * rng.normal(size=(20, 64)) for person in people])
    lists = rng.integers(0, 60, size=3_000)
    components = np.zeros(3_000, dtype=np.int64)
    components[::7] = 1
    components[0] = 0
    parts = split_large_components(components, lists, centroids.astype(np.float32), max_faces=1_500)
    small = components == 1
    assert len(np.unique(parts[small])) == 1 and not np.isin(parts[small], parts[~small]).any()
    person = lists // 20
    assert len(np.unique(parts[~small])) == 3
    for part in np.unique(parts[~small]):
        assert len(np.unique(person[parts == part])) == 1 and (parts == part).sum() <= 1_500
    _, first_faces = np.unique(parts, return_index=True)
    assert (np.diff(first_faces) > 0).all()  # numbered in the order of each part's first face
    np.testing.assert_array_equal(split_large_components(components, lists, centroids, 3_000), components)


def test_the_compressed_identity_index_reads_cosines_close_to_exact():
    """Above EXHAUSTIVE_FACES the index stores compressed codes. Their cosine estimates must stay close to
    the exact ones: with lists about one person wide, product-quantised codes read faces of other
    people as the list's person (exact cosine ~0.15 estimated >= 0.4) and chained people together."""
    rng = np.random.default_rng(0)
    people, faces_each, dimension = 1_000, 25, 512
    centres = _unit(rng.standard_normal((people, dimension), dtype=np.float32))
    noise = rng.uniform(0.65, 1.0, (people * faces_each, 1)) * _unit(
        rng.standard_normal((people * faces_each, dimension), dtype=np.float32)
    )
    faces = _unit(np.repeat(centres, faces_each, axis=0) + noise).astype(np.float32)
    params = global_phase.IdentityIndex.for_faces(len(faces))
    assert len(faces) > global_phase.EXHAUSTIVE_FACES and params.bits_per_dimension < 32
    index = params.build(faces[:: max(1, len(faces) // params.training_faces)])
    index.add(faces)
    queries = np.arange(0, len(faces), 50)
    limits, estimated, found = index.range_search(faces[queries], RULES.same_identity_similarity)
    query = np.repeat(queries, np.diff(limits.astype(np.int64)))
    exact = np.einsum("ij,ij->i", faces[query], faces[found])
    assert len(found) > len(queries) * 10  # most of each person's faces are found
    assert np.abs(estimated - exact).max() < 0.05
    assert (query // faces_each == found // faces_each).all()  # nobody else


def test_the_index_merged_on_disk_searches_as_one_filled_in_memory(tmp_path):
    """Shards write their faces as inverted lists; merged on disk, the index finds exactly what the same
    trained index finds with every face added in memory."""
    rng = np.random.default_rng(1)
    vectors = _unit(rng.standard_normal((3_000, 64), dtype=np.float32)).astype(np.float32)
    ids = rng.permutation(10_000)[:3_000].astype(np.int64)
    index = global_phase.IdentityIndex(3_000, 16, 4, 4, None).build(vectors)
    faiss.write_index(index, str(tmp_path / "trained.faiss"))
    in_memory = faiss.clone_index(index)
    in_memory.add_with_ids(vectors, ids)
    lists = [
        write_inverted_lists(index, ids[part], vectors[part], tmp_path / f"{number}.ivf")
        for number, part in enumerate(np.array_split(np.arange(3_000), 3))
    ]
    assert (np.concatenate(lists) == in_memory.quantizer.search(vectors, 1)[1].ravel()).all()
    parts = sorted(map(str, tmp_path.glob("*.ivf")))
    merge_on_disk(str(tmp_path / "trained.faiss"), parts, str(tmp_path / "index.faiss"))
    on_disk = faiss.read_index(str(tmp_path / "index.faiss"))
    assert on_disk.ntotal == 3_000
    for searched in (in_memory, on_disk):
        searched.nprobe = 4
    found = [searched.range_search(vectors[:200], 0.3) for searched in (in_memory, on_disk)]
    pairs = [
        sorted(zip(np.repeat(np.arange(200), np.diff(limits.astype(np.int64))), labels, strict=True))
        for limits, _, labels in found
    ]
    assert len(pairs[0]) > 200 and pairs[0] == pairs[1]
