"""Global phase at scale: synthetic scored shards -> ``compute_global_decisions`` under a local Ray.

Run: .venv/bin/python bench/global_bench.py [--rows 5000000]
Generates ``--rows`` scored records (10k a shard, streamed, in a child process) with planted exact and
near duplicates and identities in three datasets, runs the global phase on a local Ray with ``--cpus``
CPUs and prints: peak RSS of the driver and of the Ray workers, wall time per part, recall of the planted
duplicates, same-identity pair recall and purity (overall and per dataset) and a linear extrapolation to
43M rows. Goals at 5M: peak RSS <= 4 GiB, planted-duplicate recall >= 0.99, same-identity recall >= 0.95.

Truth is kept in ``source_path`` (``i<identity>/r<row>/s<source row or -1>``), which the phase never reads.
Identities: unit centres in 512-D, faces ``normalize(centre + s * noise)`` with ``|noise| = 1`` and
``s`` in [0.65, 1], so faces of one person meet at cosine 0.5-0.7 and different people near 0.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing
import resource
import shutil
import tempfile
import threading
import time
from pathlib import Path

import duckdb
import numpy as np
import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import ray

from filtering.config import FilterThresholds
from filtering.global_phase import DECISIONS, MAX_COMPONENT_FACES, compute_global_decisions
from infu.raycluster import start_local_ray
from infu.records import SAMPLE_SCHEMA
from infu.shards import shard_name, stats_path

DATASETS = (("laion", 0.5, 5), ("celeb", 0.35, 30), ("vgg", 0.15, 200))
"""(name, share of the rows, mean identity size)."""
PAPER_ROWS = 43_000_000
RULES = FilterThresholds(max_phash_distance=4, same_identity_similarity=0.4)
EXACT_COPIES, NEAR_COPIES, REJECTED, NO_FACE = 0.02, 0.02, 0.08, 0.05


def _splitmix64(values: np.ndarray) -> np.ndarray:
    """A 64-bit hash per integer (the pHash of an original image)."""
    z = values.astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return (z ^ (z >> np.uint64(31))).view(np.int64)


def _unit(vectors: np.ndarray) -> np.ndarray:
    return vectors / np.linalg.norm(vectors, axis=-1, keepdims=True)


def generate(folder: Path, rows: int, shard_rows: int, dimension: int, seed: int = 0) -> None:
    """Committed records-only scored shards (Parquet + stats) of ``rows`` synthetic records."""
    rng = np.random.default_rng(seed)
    dataset = rng.choice(len(DATASETS), size=rows, p=[share for _, share, _ in DATASETS]).astype(np.int8)
    identity = np.empty(rows, dtype=np.int64)
    first_identity = 0
    for code, (_, _, mean_size) in enumerate(DATASETS):
        members = np.flatnonzero(dataset == code)
        sizes = rng.geometric(1 / mean_size, size=len(members))
        sizes = sizes[: np.searchsorted(np.cumsum(sizes), len(members)) + 1]
        labels = np.repeat(np.arange(len(sizes)), sizes)[: len(members)]
        identity[members] = first_identity + rng.permutation(labels)
        first_identity += len(sizes)
    centres = _unit(rng.standard_normal((first_identity, dimension), dtype=np.float32))
    kind = rng.choice(3, size=rows, p=[1 - EXACT_COPIES - NEAR_COPIES, EXACT_COPIES, NEAR_COPIES])
    kind[:100] = 0
    source = np.where(kind > 0, (rng.random(rows) * np.arange(rows)).astype(np.int64), np.arange(rows))
    while np.any(kind[source] > 0):  # a copy of a copy is a copy of the original
        source = np.where(kind[source] > 0, source[source], source)
    source[kind == 0] = -1
    identity[kind > 0] = identity[source[kind > 0]]  # a copy shows the same person (datasets may differ)
    names = [name for name, _, _ in DATASETS]
    for start in range(0, rows, shard_rows):
        part = np.arange(start, min(rows, start + shard_rows))
        original = np.where(kind[part] > 0, source[part], part)
        phash = _splitmix64(original)
        near = kind[part] == 2
        flips = rng.integers(1, 5, size=len(part))
        masks = np.array(
            [sum(1 << int(bit) for bit in rng.choice(64, count, replace=False)) for count in flips],
            dtype=np.uint64,
        )
        phash[near] = (phash[near].view(np.uint64) ^ masks[near]).view(np.int64)
        sha = np.where(kind[part] == 1, original, part)
        scale = rng.uniform(0.65, 1.0, size=(len(part), 1)).astype(np.float32)
        noise = _unit(rng.standard_normal((len(part), dimension), dtype=np.float32))
        faces = _unit(centres[identity[part]] + scale * noise).astype(np.float32)
        has_face = rng.random(len(part)) >= NO_FACE
        status = np.where(rng.random(len(part)) < REJECTED, "rejected", "ok")
        keys = [
            f"{names[d]}-{hashlib.sha1(str(r).encode()).hexdigest()[:20]}"
            for d, r in zip(dataset[part], part, strict=True)
        ]
        embeddings = pa.FixedSizeListArray.from_arrays(faces.ravel(), dimension).cast(pa.list_(pa.float32()))
        columns = {
            "key": pa.array(keys),
            "dataset": pa.array([names[d] for d in dataset[part]]),
            "source_path": pa.array(
                [f"i{i}/r{r}/s{s}" for i, r, s in zip(identity[part], part, source[part], strict=True)]
            ),
            "sha256": pa.array([f"{value:064x}" for value in sha]),
            "status": pa.array(status),
            "face_embedding": with_nulls(has_face, embeddings),
            "phash": pa.array(phash),
            "shard": pa.array([shard_name(start // shard_rows)] * len(part)),
        }
        table = pa.table(
            [columns.get(field.name, pa.nulls(len(part), field.type)) for field in SAMPLE_SCHEMA],
            schema=SAMPLE_SCHEMA,
        )
        name = shard_name(start // shard_rows)
        pq.write_table(table, folder / f"{name}.parquet", compression="none")
        stats_path(folder, name).write_text(json.dumps({"shard": name, "count": len(part)}))


def with_nulls(mask: np.ndarray, values: pa.Array) -> pa.Array:
    """``values`` with nulls where ``mask`` is false."""
    return pa.compute.if_else(pa.array(mask), values, pa.nulls(len(values), values.type))


class RssSampler:
    """Peak memory of this process's Ray worker processes (``ray::*``), sampled every ``interval`` s: RSS,
    and its anonymous part (RSS without file-backed pages, such as the memory-mapped index files')."""

    def __init__(self, interval: float = 0.5):
        self.interval = interval
        self.peak_worker = 0
        self.peak_worker_anonymous = 0
        self.peak_worker_task = ""
        """What the worker with the most anonymous memory was running then."""
        self.peak_total = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            sizes = []
            for process in psutil.Process().children(recursive=True):
                try:
                    task = process.cmdline()[0] if process.cmdline() else ""
                    if task.startswith("ray::"):
                        memory = process.memory_info()
                        sizes.append(memory.rss)
                        if memory.rss - memory.shared > self.peak_worker_anonymous:
                            self.peak_worker_anonymous, self.peak_worker_task = (
                                memory.rss - memory.shared,
                                task,
                            )
                except psutil.Error:
                    continue
            self.peak_worker = max(self.peak_worker, max(sizes, default=0))
            self.peak_total = max(self.peak_total, sum(sizes))


def evaluate(scored: Path, decisions: Path) -> dict[str, float]:
    """Recall of planted duplicates, same-identity pair recall and purity from the truth in source_path."""
    con = duckdb.connect()
    con.execute(
        f"""
        CREATE TABLE truth AS SELECT key, dataset, status,
            CAST(regexp_extract(source_path, 'i(\\d+)/', 1) AS BIGINT) AS person,
            CAST(regexp_extract(source_path, '/r(\\d+)/', 1) AS BIGINT) AS row,
            CAST(regexp_extract(source_path, '/s(-?\\d+)$', 1) AS BIGINT) AS source,
            face_embedding IS NOT NULL AS has_face
        FROM read_parquet('{scored}/*.parquet');
        CREATE TABLE decided AS SELECT * FROM read_parquet('{decisions}/*.parquet');
        CREATE TABLE joined AS SELECT truth.*, decided.identity_cluster,
            coalesce(regexp_extract(decided.reject_detail, '(\\S+)$', 1), truth.key) AS grp
        FROM truth LEFT JOIN decided USING (key) WHERE truth.status = 'ok'
        """
    )
    [(detected, planted)] = con.execute(
        """
        SELECT count(*) FILTER (WHERE copy.grp = original.grp OR copy.grp = original.key
                                OR original.grp = copy.key), count(*)
        FROM joined AS copy JOIN joined AS original ON original.row = copy.source
        """
    ).fetchall()
    result = {"duplicate_recall": detected / planted, "planted_duplicates": planted}
    for name, where in [("all", "true"), *((name, f"dataset = '{name}'") for name, _, _ in DATASETS)]:
        [(together, same_person, same_cluster)] = con.execute(
            f"""
            WITH faces AS (SELECT * FROM joined WHERE has_face AND {where}),
            both_ AS (SELECT count(*) AS n FROM faces GROUP BY dataset, person, identity_cluster),
            people AS (SELECT count(*) AS n FROM faces GROUP BY dataset, person),
            clusters AS (SELECT count(*) AS n FROM faces GROUP BY identity_cluster)
            SELECT (SELECT sum(n * (n - 1) / 2) FROM both_), (SELECT sum(n * (n - 1) / 2) FROM people),
                   (SELECT sum(n * (n - 1) / 2) FROM clusters)
            """
        ).fetchall()
        result[f"identity_recall_{name}"] = together / same_person
        result[f"identity_purity_{name}"] = together / same_cluster
    con.close()
    return result


def _scored_shards(args: argparse.Namespace, temporary: Path) -> Path:
    """The synthetic scored shards: generated in a child process, kept in ``--workdir`` (and reused
    from there) when given, else in ``temporary``."""
    name = f"scored-{args.rows}-{args.shard_rows}-{args.dimension}"
    scored = (args.workdir or temporary) / name
    done = scored / "_generated"
    if done.exists():
        print(f"reusing {args.rows} generated rows in {scored}", flush=True)
        return scored
    shutil.rmtree(scored, ignore_errors=True)
    scored.mkdir(parents=True)
    started = time.perf_counter()
    child = multiprocessing.get_context("spawn").Process(
        target=generate, args=(scored, args.rows, args.shard_rows, args.dimension)
    )
    child.start()
    child.join()
    if child.exitcode:
        raise SystemExit(f"generating the shards failed (exit {child.exitcode})")
    done.touch()
    print(f"generated {args.rows} rows in {time.perf_counter() - started:.0f} s", flush=True)
    return scored


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=5_000_000)
    parser.add_argument("--shard-rows", type=int, default=10_000)
    parser.add_argument("--dimension", type=int, default=512)
    parser.add_argument("--cpus", type=int, default=2)
    parser.add_argument(
        "--max-component-faces",
        type=int,
        default=MAX_COMPONENT_FACES,
        help="components above this many faces are cut into parts (to measure what the cut costs)",
    )
    parser.add_argument(
        "--workdir",
        type=Path,
        default=None,
        help="keep (and reuse) the generated shards here (default: a temp dir)",
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.workdir) as folder:
        scored = _scored_shards(args, Path(folder))
        out = Path(folder) / "global"
        out.mkdir()
        start_local_ray(num_cpus=args.cpus, include_dashboard=False)
        base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        started = time.perf_counter()
        with RssSampler() as workers:
            stats = compute_global_decisions(scored, out, RULES, max_component_faces=args.max_component_faces)
        wall = time.perf_counter() - started
        driver_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        ray.shutdown()
        quality = evaluate(scored, out / DECISIONS)
    gib = 1 << 30
    scale = PAPER_ROWS / args.rows
    index_bytes = stats.get("identity_index", {}).get("megabytes", 0) * 1e6
    print(json.dumps(stats, indent=1))
    print(
        f"rows {args.rows} | wall {wall:.0f} s | "
        + " ".join(f"{k} {v:.0f}s" for k, v in stats["seconds"].items())
    )
    print(
        f"peak RSS: driver {driver_rss / gib:.2f} GiB (before the phase {base_rss / gib:.2f}) | "
        f"largest Ray worker {workers.peak_worker / gib:.2f} GiB "
        f"(anonymous {workers.peak_worker_anonymous / gib:.2f}, in {workers.peak_worker_task}) | "
        f"all workers {workers.peak_total / gib:.2f} GiB"
    )
    print(
        f"planted duplicates: recall {quality['duplicate_recall']:.4f} of {quality['planted_duplicates']} | "
        + " | ".join(
            f"identity {name}: recall {quality[f'identity_recall_{name}']:.4f} "
            f"purity {quality[f'identity_purity_{name}']:.4f}"
            for name in ["all", *(name for name, _, _ in DATASETS)]
        )
    )
    print(
        f"linear extrapolation to {PAPER_ROWS / 1e6:.0f}M rows: {wall * scale / 3600:.1f} h "
        f"on {args.cpus} CPUs, "
        f"driver {base_rss / gib + (driver_rss - base_rss) * scale / gib:.1f} GiB (growth scaled), "
        f"identity index on disk {index_bytes * scale / 1e9:.1f} GB ({index_bytes / 1e6:.0f} MB here; "
        f"memory-mapped, one copy in a node's page cache for all its workers)"
    )


if __name__ == "__main__":
    main()
