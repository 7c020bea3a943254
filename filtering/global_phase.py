"""Global phase of the SPSS filter at scale: duplicates and identity clusters over every kept row.

Memory follows one shard plus a few compact per-row arrays, never the dataset:

* **rows** (DuckDB, out of core): every kept row's key, dataset, shard, sha256 and pHash, numbered in
  global key order (``rid``, duplicates keep the first) and in (dataset, key) order (``iid``, identity
  clusters are per dataset).
* **duplicates**: equal sha256s and equal pHashes are grouped by DuckDB; the distinct pHashes (8 bytes
  a row) are searched with the block tables of :mod:`filtering.dedup` (measured ~75x faster than faiss'
  ``IndexBinaryMultiHash`` range search at radius 4 on 4M hashes, 18.6 s vs ~1400 s); the tables run as
  Ray tasks. Groups are the connected components of the links; the first row of a group is kept.
* **identity clusters** (faiss): an IVF index over the face embeddings, trained on a sample spread over
  the (dataset, key) order. Up to ``EXHAUSTIVE_FACES`` faces it is one list of raw vectors (exhaustive,
  exact); beyond, ``4 sqrt(n)`` lists (rounded to a power of two) of 4-bit scalar-quantised codes (256
  bytes for 512-D), ``PROBES`` lists probed. Product-quantised codes (64 bytes) were measured and
  dropped: at 300k faces their cosine estimates put ~0.5% of the found pairs between different people
  (exact cosine 0.05-0.26 read as >= 0.4, the lists being about one person wide), chaining 75 people into
  one component, and missed same-person pairs (small identities: 0.89 of pairs connected vs 0.96).
  As Ray actors when Ray is up and there are more than ``RAY_ROWS`` kept rows (else in this process),
  per shard: read its embeddings and write them, encoded, as inverted lists of their own; these are
  merged list by list into one index whose lists stay on disk (faiss ``OnDiskInvertedLists``),
  memory-mapped by the searching workers (a node's workers share its pages; no process holds the whole
  index); then each shard's faces are range-searched at the same-identity cosine,
  keeping per face its ``NEIGHBOUR_CAP`` earliest earlier neighbours of its dataset (and, while it has
  fewer, itself as an earlier neighbour of its later ones). The pairs stream into their connected
  components (:class:`StreamingComponents`), the candidate groups. A person's faces stay connected
  even when the search misses many of their pairs, which a leader pass over the approximate lists
  alone would turn into split clusters
  (measured: same-identity recall 0.64 with lists vs 0.97 with components on the test data). Approximate
  links can chain many people into one giant component; a component of more than
  ``max_component_faces`` faces is cut into parts of whole IVF lists, grouped by recursive 2-means on
  the list centroids (:func:`split_large_components`), so a part stays bounded while a person's lists
  stay together. Each shard then writes its faces of every batch of components, and each batch is
  clustered exactly (greedy leader clustering in key order, :func:`filtering.identity.leaders_in_order`)
  on the exact vectors, as Ray tasks: no member ends below the threshold of its leader. With the
  exhaustive index the components hold every pair at or above the threshold, so the result equals
  :func:`filtering.identity.cluster_identities`.
* **decisions**: joined in DuckDB and written as one Parquet file per committed shard.
"""

from __future__ import annotations

import math
import shutil
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import duckdb
import faiss
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from filtering.config import FilterThresholds
from filtering.dedup import (
    duplicate_relations,
    keep_first,
    pairs_from_codes,
    pairs_in_tables,
    table_masks,
)
from filtering.identity import leaders_in_order
from infu.face.base import normalize_rows
from infu.records import RejectReason, Status
from infu.shards import committed_shards

DECISIONS = "decisions"
WORK = "_work"
DECISION_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("reject_reason", pa.string()),
        ("reject_detail", pa.string()),
        ("identity_cluster", pa.string()),
    ]
)
EXHAUSTIVE_FACES = 20_000
"""Up to this many faces the identity index is one list of raw vectors: exact, like the reference."""
MAX_TRAINING_FACES = 100_000
TRAINING_FACES_PER_LIST = 24
NEIGHBOUR_CAP = 8
PROBES = 16
DUCKDB_MEMORY = "1GB"
BATCH_ROWS = 1 << 20
BATCH_FACES = 100_000
MAX_COMPONENT_FACES = BATCH_FACES
RAY_ROWS = EXHAUSTIVE_FACES
"""Above this many kept rows the phase's parallel parts run on Ray (when it is up); below, Ray's worker
start-up would cost more than the work, which runs in this process."""


@dataclass(frozen=True)
class IdentityIndex:
    """Parameters of the identity index, chosen from the number of faces."""

    faces: int
    lists: int
    bits_per_dimension: int
    """32: raw float32 vectors (exact similarities); 4: 4-bit scalar-quantised codes."""
    probes: int
    neighbour_cap: int | None
    """Earlier neighbours kept per face (None: all)."""

    @classmethod
    def for_faces(cls, faces: int) -> IdentityIndex:
        if faces <= EXHAUSTIVE_FACES:
            return cls(faces, 1, 32, 1, None)
        lists = 2 ** round(math.log2(4 * math.sqrt(faces)))
        return cls(faces, lists, 4, PROBES, NEIGHBOUR_CAP)

    @property
    def training_faces(self) -> int:
        return TRAINING_FACES_PER_LIST * self.lists

    def build(self, training: np.ndarray) -> faiss.IndexIVF:
        dimension = training.shape[1]
        quantizer = faiss.IndexFlatIP(dimension)
        if self.bits_per_dimension == 32:
            index = faiss.IndexIVFFlat(quantizer, dimension, self.lists, faiss.METRIC_INNER_PRODUCT)
        else:
            index = faiss.IndexIVFScalarQuantizer(
                quantizer, dimension, self.lists, faiss.ScalarQuantizer.QT_4bit, faiss.METRIC_INNER_PRODUCT
            )
        index.cp.min_points_per_centroid = 1
        index.cp.niter = 10
        index.train(training)
        index.nprobe = self.probes
        return index


def compute_global_decisions(
    scored_dir: Path, out: Path, rules: FilterThresholds, max_component_faces: int = MAX_COMPONENT_FACES
) -> dict[str, Any]:
    """Write ``out/decisions/<shard>.parquet`` (:data:`DECISION_SCHEMA`) for every committed shard of
    ``scored_dir``: the keys of that shard with a decision (duplicates with reason and detail, faces
    with their identity cluster). Only rows with status ``ok`` take part. Components of the neighbour
    graph with more than ``max_component_faces`` faces are split (:func:`split_large_components`).
    Returns stats."""
    scored_dir, out = Path(scored_dir), Path(out)
    work = out / WORK
    (work / "rows").mkdir(parents=True)
    (out / DECISIONS).mkdir()
    shards = committed_shards(scored_dir)
    timer = _Timer()
    con = duckdb.connect(
        str(work / "global.duckdb"),
        config={
            "memory_limit": DUCKDB_MEMORY,
            "temp_directory": str(work / "duckdb_tmp"),
            "preserve_insertion_order": False,
        },
    )
    try:
        with timer("rows"):
            kept = _load_rows(con, scored_dir, shards, work / "rows")
        on_ray = ray.is_initialized() and kept > RAY_ROWS
        with timer("duplicates"):
            duplicate_stats = _find_duplicates(con, kept, rules.max_phash_distance, on_ray)
        identity_stats = _cluster_identities(
            con,
            scored_dir,
            work / "rows",
            shards,
            kept,
            rules.same_identity_similarity,
            max_component_faces,
            on_ray,
            timer,
        )
        with timer("write"):
            _write_decisions(con, out / DECISIONS, shards, kept)
    finally:
        con.close()
        shutil.rmtree(work, ignore_errors=True)
    return {
        "shards": len(shards),
        "kept_rows": kept,
        **duplicate_stats,
        **identity_stats,
        "seconds": timer.seconds,
    }


class _Timer:
    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    def __call__(self, part: str) -> _Timer:
        self.part = part
        return self

    def __enter__(self) -> None:
        self.started = time.perf_counter()

    def __exit__(self, *exc: object) -> None:
        self.seconds[self.part] = round(time.perf_counter() - self.started, 3)


def _load_rows(con: duckdb.DuckDBPyConnection, scored_dir: Path, shards: list[str], rows_dir: Path) -> int:
    """Table ``rows`` of the kept rows with both numberings; per shard, ``rows/<shard>.parquet`` maps
    each kept row's position in the scored file to its ``iid``. Returns the number of kept rows."""
    con.execute(
        "CREATE TABLE rows (rid BIGINT, iid BIGINT, key VARCHAR, dataset VARCHAR, shard VARCHAR, "
        "file_row BIGINT, sha256 VARCHAR, phash BIGINT)"
    )
    if shards:
        files = pa.table(
            {"filename": [str(scored_dir / f"{name}.parquet") for name in shards], "shard_name": shards}
        )
        con.register("shard_files", files)
        con.execute(
            """
            INSERT INTO rows
            SELECT row_number() OVER (ORDER BY key, shard, file_row_number) - 1,
                   row_number() OVER (ORDER BY dataset, key, shard, file_row_number) - 1,
                   key, dataset, shard, file_row_number, sha256, phash
            FROM read_parquet(?, filename = true, file_row_number = true) JOIN shard_files USING (filename)
            WHERE status = ?
            """,
            [files["filename"].to_pylist(), Status.OK.value],
        )
        con.unregister("shard_files")
    _split_by_shard(
        con.sql("SELECT shard, file_row, iid FROM rows ORDER BY shard, file_row"), rows_dir, shards
    )
    return con.execute("SELECT count(*) FROM rows").fetchall()[0][0]


def _split_by_shard(
    result: duckdb.DuckDBPyRelation, folder: Path, shards: list[str], schema: pa.Schema | None = None
) -> None:
    """Stream a result ordered by its ``shard`` column into ``folder/<shard>.parquet`` (the other columns,
    cast to ``schema``), one file per name of ``shards`` (empty when it has no rows)."""
    reader = result.to_arrow_reader(BATCH_ROWS)
    schema = schema or pa.schema([field for field in reader.schema if field.name != "shard"])
    parts: list[pa.Table] = []
    current: str | None = None

    def flush() -> None:
        if current is not None:
            pq.write_table(
                pa.concat_tables(parts).select(schema.names).cast(schema), folder / f"{current}.parquet"
            )

    for batch in reader:
        table = pa.Table.from_batches([batch])
        names = table["shard"].to_numpy(zero_copy_only=False)
        cuts = np.flatnonzero(names[1:] != names[:-1]) + 1
        for start, stop in zip(np.r_[0, cuts], np.r_[cuts, len(names)], strict=True):
            if names[start] != current:
                flush()
                current, parts = names[start], []
            parts.append(table.slice(start, stop - start))
    flush()
    for name in shards:
        if not (folder / f"{name}.parquet").exists():
            pq.write_table(schema.empty_table(), folder / f"{name}.parquet")


def _column(con: duckdb.DuckDBPyConnection, query: str) -> list[np.ndarray]:
    table = con.sql(query).to_arrow_table()
    return [column.to_numpy() for column in table.columns]


def _find_duplicates(
    con: duckdb.DuckDBPyConnection, kept: int, max_distance: int, on_ray: bool
) -> dict[str, Any]:
    """Table ``duplicates(rid, kept, relation)``: every kept row that is not the first of its group."""
    same_sha, sha_first = _column(con, _same_as("sha256"))
    same_hash, hash_first = _column(con, _same_as("phash"))
    table = con.sql("SELECT phash FROM rows ORDER BY rid").to_arrow_table()["phash"]
    has_hash = table.is_valid().to_numpy(zero_copy_only=False)
    hashes = table.fill_null(0).to_numpy().view(np.uint64)
    distinct = has_hash.copy()
    distinct[same_hash] = False
    distinct_rids = np.flatnonzero(distinct)
    pairs, _ = pairs_from_codes(
        hashes[distinct_rids], _near_codes(hashes[distinct_rids], max_distance, on_ray)
    )
    near_first, near_second = distinct_rids[pairs[:, 0]], distinct_rids[pairs[:, 1]]
    marked, kept_rid = keep_first(
        np.concatenate([same_sha, same_hash, near_second]),
        np.concatenate([sha_first, hash_first, near_first]),
    )
    position = np.minimum(np.searchsorted(same_sha, marked), max(len(same_sha) - 1, 0))
    exact = (
        (same_sha[position] == marked) & (sha_first[position] == kept_rid) if len(same_sha) else marked < 0
    )
    relations = duplicate_relations(
        exact, hashes[marked] ^ hashes[kept_rid], has_hash[marked] & has_hash[kept_rid]
    )
    con.register("found", pa.table({"rid": marked, "kept": kept_rid, "relation": relations}))
    con.execute("CREATE TABLE duplicates AS SELECT * FROM found")
    con.unregister("found")
    return {
        "exact_duplicates": int(exact.sum()),
        "near_duplicates": int(len(marked) - exact.sum()),
        "near_pairs": len(pairs),
        "distinct_phashes": len(distinct_rids),
    }


def _same_as(column: str) -> str:
    """Rows whose ``column`` equals that of an earlier row, with the first row holding that value."""
    return f"""
        SELECT rows.rid, groups.first FROM rows JOIN (
            SELECT {column}, min(rid) AS first FROM rows WHERE {column} IS NOT NULL
            GROUP BY {column} HAVING count(*) > 1
        ) AS groups USING ({column})
        WHERE rows.rid <> groups.first ORDER BY rows.rid
    """


def _near_codes(hashes: np.ndarray, max_distance: int, on_ray: bool) -> np.ndarray:
    """Pair codes of hashes within ``max_distance`` bits; the block tables run as Ray tasks ``on_ray``."""
    masks = table_masks(len(hashes), max_distance)
    if not on_ray or len(masks) == 1:
        return pairs_in_tables(hashes, masks, max_distance)[0]
    workers = min(len(masks), _cpus())
    task = ray.remote(pairs_in_tables)
    shared = ray.put(hashes)
    found = ray.get([task.remote(shared, masks[part::workers], max_distance) for part in range(workers)])
    return np.unique(np.concatenate([codes for codes, _ in found]))


def _cpus() -> int:
    return max(1, int(ray.cluster_resources().get("CPU", 1)))


class FaceShards:
    """Per-shard work on face embeddings: sample, encode into the index, search it.

    One instance per Ray actor (or one in this process); it reads one shard at a time."""

    def __init__(
        self,
        scored_dir: str,
        rows_dir: str,
        dataset_starts: np.ndarray,
        threshold: float,
        index_file: str | None = None,
        neighbour_cap: int | None = None,
        threads: int | None = None,
    ):
        self.scored_dir, self.rows_dir = Path(scored_dir), Path(rows_dir)
        self.dataset_starts = dataset_starts
        self.threshold = threshold
        # The filled index keeps its lists on disk, memory-mapped: the workers of a node share its pages.
        self.index = faiss.read_index(index_file) if index_file else None
        self.neighbour_cap = np.iinfo(np.int64).max if neighbour_cap is None else neighbour_cap
        if threads:
            faiss.omp_set_num_threads(threads)

    def faces(self, shard: str) -> tuple[np.ndarray, np.ndarray]:
        """``iid`` and L2-normalised embedding of the shard's kept rows with a face."""
        rows = pq.read_table(self.rows_dir / f"{shard}.parquet")
        scored = pq.read_table(self.scored_dir / f"{shard}.parquet", columns=["face_embedding"])
        embeddings = scored["face_embedding"].take(rows["file_row"])
        with_face = embeddings.is_valid()
        iids = rows["iid"].filter(with_face).to_numpy()
        values = pc.list_flatten(embeddings.filter(with_face)).to_numpy(zero_copy_only=False)
        return iids, normalize_rows(values.reshape(len(iids), -1)) if len(iids) else np.empty((0, 0))

    def sample(self, shard: str, stride: int) -> tuple[int, np.ndarray, np.ndarray]:
        """Number of faces, and ``iid`` and embedding of those whose ``iid`` is a multiple of ``stride``."""
        iids, vectors = self.faces(shard)
        chosen = iids % stride == 0
        return len(iids), iids[chosen], vectors[chosen]

    def encode(self, shard: str, folder: str) -> tuple[np.ndarray, np.ndarray]:
        """Write the shard's faces, encoded into the trained index, as inverted lists to
        ``folder/<shard>.ivf`` (when it has faces); return their ``iid`` and IVF list number."""
        iids, vectors = self.faces(shard)
        if not len(iids):
            return iids, iids
        return iids, write_inverted_lists(self.index, iids, vectors, Path(folder) / f"{shard}.ivf")

    def scatter(self, shard: str, folder: str, lookup: dict[str, np.ndarray]) -> None:
        """Write the shard's faces of every batch of components to ``folder/<batch>/<shard>.parquet``
        (``lookup``: sorted face ``iid``s with their component and batch, -1 for none)."""
        iids, vectors = self.faces(shard)
        position = np.searchsorted(lookup["face_iids"], iids)
        batches = lookup["batches"][position]
        for batch in np.unique(batches[batches >= 0]).tolist():
            chosen = batches == batch
            embeddings = pa.FixedSizeListArray.from_arrays(vectors[chosen].ravel(), vectors.shape[1])
            table = pa.table(
                {
                    "iid": iids[chosen],
                    "component": lookup["components"][position[chosen]],
                    "embedding": embeddings,
                }
            )
            pq.write_table(table, Path(folder) / str(batch) / f"{shard}.parquet")

    def search(self, shard: str) -> pa.Table:
        """Neighbour pairs ``(face, earlier)`` of the shard's faces: each face's earliest
        ``neighbour_cap`` earlier neighbours of its dataset at or above the threshold, and while it has
        fewer than that, itself as the earlier neighbour of its later ones."""
        iids, vectors = self.faces(shard)
        if not len(iids):
            return _pairs_table(np.empty(0, np.int64), np.empty(0, np.int64))
        limits, similarities, found = self.index.range_search(vectors, self.threshold)
        position = np.repeat(np.arange(len(iids)), np.diff(limits.astype(np.int64)))
        query = iids[position]
        dataset = np.searchsorted(self.dataset_starts, query, side="right") - 1
        keep = (found >= self.dataset_starts[dataset]) & (found < self.dataset_starts[dataset + 1])
        keep &= (found != query) & (similarities >= self.threshold)
        earlier = found < query
        # Per query its earlier neighbours first, in key order, then the later ones.
        order = np.lexsort((found, ~earlier, position))
        order = order[keep[order]]
        position, query, found, earlier = (values[order] for values in (position, query, found, earlier))
        rank = np.arange(len(position)) - np.searchsorted(position, position)
        earlier_count = np.bincount(position[earlier], minlength=len(iids))
        own = earlier & (rank < self.neighbour_cap)
        handed = ~earlier & (earlier_count[position] < self.neighbour_cap)
        return _pairs_table(
            np.concatenate([query[own], found[handed]]), np.concatenate([found[own], query[handed]])
        )


def write_inverted_lists(
    index: faiss.IndexIVF, ids: np.ndarray, vectors: np.ndarray, path: Path
) -> np.ndarray:
    """Write ``vectors`` (with ``ids``), encoded into the trained ``index``, as inverted lists to ``path``
    (the part :func:`merge_on_disk` reads); returns each vector's list number."""
    codes = index.sa_encode(vectors)
    coarse_bytes = index.coarse_code_size()
    lists = _list_numbers(codes[:, :coarse_bytes])
    order = np.argsort(lists, kind="stable")
    ids, codes = (
        np.ascontiguousarray(ids[order], dtype=np.int64),
        np.ascontiguousarray(codes[order, coarse_bytes:]),
    )
    used, starts, counts = np.unique(lists[order], return_index=True, return_counts=True)
    part = faiss.ArrayInvertedLists(index.nlist, index.code_size)
    for number, start, count in zip(used.tolist(), starts.tolist(), counts.tolist(), strict=True):
        part.add_entries(number, count, faiss.swig_ptr(ids[start:]), faiss.swig_ptr(codes[start:]))
    faiss.write_InvertedLists(part, faiss.FileIOWriter(str(path)))
    return lists


def merge_on_disk(trained_file: str, part_files: list[str], index_file: str) -> None:
    """Write ``index_file``: the trained index of ``trained_file`` filled with the inverted lists of
    ``part_files``, merged list by list into ``<index_file>.ivfdata``, where the index keeps them
    (memory-mapped when read). The parts are read through memory maps too: no process holds the index."""
    index = faiss.read_index(trained_file)
    parts = [faiss.read_InvertedLists(faiss.FileIOReader(path), faiss.IO_FLAG_MMAP) for path in part_files]
    merged = faiss.OnDiskInvertedLists(index.nlist, index.code_size, f"{index_file}.ivfdata")
    pointers = faiss.InvertedListsPtrVector()
    for part in parts:
        pointers.push_back(part)
    index.ntotal = merged.merge_from_multiple(pointers.data(), pointers.size(), False)
    index.replace_invlists(merged, True)
    merged.this.disown()
    faiss.write_index(index, index_file)


def _pairs_table(faces: np.ndarray, earlier: np.ndarray) -> pa.Table:
    return pa.table({"face": faces.astype(np.int64), "earlier": earlier.astype(np.int64)})


def _map_shards(
    on_ray: bool, settings: dict[str, Any], method: str, shards: list[str], *args: Any
) -> Iterator[Any]:
    """``FaceShards(**settings).<method>(shard, *args)`` for every shard, in shard order: ``on_ray``, on a
    pool of Ray actors (one CPU each), else here."""
    if not on_ray:
        worker = FaceShards(**settings)
        for shard in shards:
            yield getattr(worker, method)(shard, *args)
        return
    actor = ray.remote(num_cpus=1)(FaceShards)
    pool = ray.util.ActorPool([actor.remote(**settings, threads=1) for _ in range(min(len(shards), _cpus()))])
    shared_args = [ray.put(arg) for arg in args]
    yield from pool.map(lambda worker, shard: getattr(worker, method).remote(shard, *shared_args), shards)


def _cluster_identities(
    con: duckdb.DuckDBPyConnection,
    scored_dir: Path,
    rows_dir: Path,
    shards: list[str],
    kept: int,
    threshold: float,
    max_component_faces: int,
    on_ray: bool,
    timer: _Timer,
) -> dict[str, Any]:
    """Table ``clusters(iid, number)``: per face its cluster's number within its dataset."""
    starts = [
        row[0] for row in con.execute("SELECT min(iid) FROM rows GROUP BY dataset ORDER BY 1").fetchall()
    ]
    dataset_starts = np.array([*starts, kept], dtype=np.int64)
    settings: dict[str, Any] = dict(
        scored_dir=str(scored_dir), rows_dir=str(rows_dir), dataset_starts=dataset_starts, threshold=threshold
    )
    with timer("identity_sample"):
        sampled = list(_map_shards(on_ray, settings, "sample", shards, max(1, kept // MAX_TRAINING_FACES)))
    faces = sum(count for count, _, _ in sampled)
    con.execute("CREATE TABLE clusters (iid BIGINT, number BIGINT)")
    if not faces:
        return {"faces": 0, "identity_clusters": 0}
    pool_iids = np.concatenate([iids for _, iids, _ in sampled])
    pool = np.concatenate([vectors for _, _, vectors in sampled if len(vectors)])[np.argsort(pool_iids)]
    del sampled
    params = IdentityIndex.for_faces(faces)
    work = rows_dir.parent
    trained_file, index_file, parts = (
        work / "identity-trained.faiss",
        work / "identity.faiss",
        work / "identity",
    )
    with timer("identity_train"):
        chosen = np.unique(np.linspace(0, len(pool) - 1, min(len(pool), params.training_faces)).astype(int))
        index = params.build(pool[chosen])
        faiss.write_index(index, str(trained_file))
        del pool
    with timer("identity_encode"):
        parts.mkdir()
        encoding = {**settings, "index_file": str(trained_file)}
        shard_iids, shard_lists = zip(
            *_map_shards(on_ray, encoding, "encode", shards, str(parts)), strict=True
        )
        face_iids = np.concatenate(shard_iids)
        order = np.argsort(face_iids)
        face_iids, face_lists = face_iids[order], np.concatenate(shard_lists)[order]
        del shard_iids, shard_lists, order
        index_megabytes = round(faces * (index.code_size + 8) / 1e6, 1)
        centroids = index.quantizer.reconstruct_n(0, index.nlist)
        del index
        files = str(trained_file), sorted(map(str, parts.glob("*.ivf"))), str(index_file)
        if on_ray:  # the driver never maps the index's data
            ray.get(ray.remote(num_cpus=1)(merge_on_disk).remote(*files))
        else:
            merge_on_disk(*files)
        shutil.rmtree(parts)
    with timer("identity_search"):
        graph = StreamingComponents(faces)
        searching = {**settings, "index_file": str(index_file), "neighbour_cap": params.neighbour_cap}
        for found in _map_shards(on_ray, searching, "search", shards):
            graph.add(*(np.searchsorted(face_iids, found[name].to_numpy()) for name in found.column_names))
    with timer("identity_components"):
        components = graph.components()
        largest_component = int(np.bincount(components).max())
        components = split_large_components(components, face_lists, centroids, max_component_faces)
    with timer("identity_leaders"):
        leaders = _leaders_by_component(on_ray, settings, rows_dir.parent, shards, face_iids, components)
        is_leader = leaders == np.arange(faces)
        dataset = np.searchsorted(dataset_starts, face_iids, side="right") - 1
        leaders_before = np.r_[0, np.cumsum(is_leader)][np.searchsorted(face_iids, dataset_starts[:-1])]
        numbers = (np.cumsum(is_leader) - 1)[leaders] - leaders_before[dataset]
        con.register("found", pa.table({"iid": face_iids, "number": numbers}))
        con.execute("INSERT INTO clusters SELECT * FROM found")
        con.unregister("found")
    sizes = np.bincount(components)
    return {
        "faces": faces,
        "identity_clusters": int(is_leader.sum()),
        "neighbour_pairs": graph.edges,
        "components": len(sizes),
        "largest_component": largest_component,
        "largest_part": int(sizes.max()),
        "identity_index": {**asdict(params), "megabytes": index_megabytes},
    }


class StreamingComponents:
    """Connected components of a graph on ``nodes`` nodes whose edges arrive in batches.

    Memory is a label per node plus about ``merge_edges`` pending edges: every node's label is the
    smallest node of its component so far; pending edges are merged by finding the components of the
    graph on the labels they join (scipy) and relabelling every node."""

    def __init__(self, nodes: int, merge_edges: int = 1 << 22):
        self.labels = np.arange(nodes, dtype=np.int64)
        self.merge_edges = merge_edges
        self.edges = 0
        self._pending: list[tuple[np.ndarray, np.ndarray]] = []
        self._pending_edges = 0

    def add(self, first: np.ndarray, second: np.ndarray) -> None:
        """Edges ``first[i] - second[i]`` (node numbers)."""
        self._pending.append((first, second))
        self._pending_edges += len(first)
        self.edges += len(first)
        if self._pending_edges >= self.merge_edges:
            self._merge()

    def _merge(self) -> None:
        if not self._pending:
            return
        first = self.labels[np.concatenate([edge[0] for edge in self._pending])]
        second = self.labels[np.concatenate([edge[1] for edge in self._pending])]
        self._pending, self._pending_edges = [], 0
        joined = first != second
        ends, local = np.unique(np.concatenate([first[joined], second[joined]]), return_inverse=True)
        if not len(ends):
            return
        count = int(joined.sum())
        graph = coo_matrix(
            (np.ones(count, dtype=np.int8), (local[:count], local[count:])), shape=(len(ends), len(ends))
        )
        groups, group_of_end = connected_components(graph, directed=False)
        smallest = np.full(groups, len(self.labels), dtype=np.int64)
        np.minimum.at(smallest, group_of_end, ends)
        relabel = np.arange(len(self.labels), dtype=np.int64)
        relabel[ends] = smallest[group_of_end]
        self.labels = relabel[self.labels]

    def components(self) -> np.ndarray:
        """Per node its component, numbered 0.. in the order of each component's smallest node."""
        self._merge()
        return np.unique(self.labels, return_inverse=True)[1]


def _list_numbers(coarse_codes: np.ndarray) -> np.ndarray:
    """IVF list numbers from the coarse part of faiss codes (little-endian, as ``sa_encode`` writes it)."""
    padded = np.zeros((len(coarse_codes), 8), dtype=np.uint8)
    padded[:, : coarse_codes.shape[1]] = coarse_codes
    return padded.view("<i8").ravel()


def split_large_components(
    components: np.ndarray, lists: np.ndarray, centroids: np.ndarray, max_faces: int
) -> np.ndarray:
    """``components`` (per face, numbered 0..) with every component of more than ``max_faces`` faces cut
    into parts of whole IVF lists (``lists``: per face its list; ``centroids``: per list its centroid):
    the component's lists are split in two by 2-means on their centroids weighted by its faces in each,
    recursively, until a part holds at most ``max_faces`` faces or one list. Returns the new numbering
    (0.., in the order of each part's first face)."""
    sizes = np.bincount(components)
    large = np.flatnonzero(sizes > max_faces)
    if not len(large):
        return components
    labels = components.copy()
    next_label = len(sizes)
    by_component = np.argsort(components, kind="stable")
    starts = np.r_[0, np.cumsum(sizes)]
    for component in large.tolist():
        members = by_component[starts[component] : starts[component + 1]]
        used, faces_per_list = np.unique(lists[members], return_counts=True)
        groups = _group_lists(centroids[used], faces_per_list, max_faces)
        part = groups[np.searchsorted(used, lists[members])]
        labels[members] = np.where(part == 0, component, next_label + part - 1)
        next_label += int(groups.max())
    first_face = np.full(next_label, len(labels), dtype=np.int64)
    np.minimum.at(first_face, labels, np.arange(len(labels)))
    rank = np.empty(next_label, dtype=np.int64)
    rank[np.argsort(first_face, kind="stable")] = np.arange(next_label)
    return np.unique(rank[labels], return_inverse=True)[1]


def _group_lists(centroids: np.ndarray, weights: np.ndarray, max_faces: int) -> np.ndarray:
    """Per list a group number (0..) such that each group holds at most ``max_faces`` faces or one list
    (recursive weighted 2-means; a split 2-means cannot make is done at the weighted median of the
    principal direction)."""
    groups = np.zeros(len(centroids), dtype=np.int64)
    pending, group_count = [np.arange(len(centroids))], 0
    while pending:
        chosen = pending.pop()
        if weights[chosen].sum() <= max_faces or len(chosen) == 1:
            groups[chosen] = group_count
            group_count += 1
            continue
        points = np.ascontiguousarray(centroids[chosen], dtype=np.float32)
        kmeans = faiss.Kmeans(points.shape[1], 2, niter=10, seed=len(chosen), min_points_per_centroid=1)
        kmeans.train(points, weights=weights[chosen].astype(np.float32))
        side = kmeans.index.search(points, 1)[1].ravel() == 1
        if side.all() or not side.any():
            centred = points - np.average(points, axis=0, weights=weights[chosen])
            projection = centred @ np.linalg.svd(centred, full_matrices=False)[2][0]
            order = np.argsort(projection)
            cumulative = np.cumsum(weights[chosen][order])
            cut = np.clip(np.searchsorted(cumulative, cumulative[-1] / 2), 1, len(chosen) - 1)
            side = np.zeros(len(chosen), dtype=bool)
            side[order[cut:]] = True
        pending += [chosen[side], chosen[~side]]
    return groups


def _leaders_by_component(
    on_ray: bool,
    settings: dict[str, Any],
    work: Path,
    shards: list[str],
    face_iids: np.ndarray,
    components: np.ndarray,
) -> np.ndarray:
    """Per face (in ``iid`` order) the position of its leader, by exact leader clustering within each
    component of the neighbour graph, on the exact embeddings.

    Faces of two components share no pair at or above the threshold (as far as the search found), so a
    face's decision only depends on its own component, visited in key order like the reference. The
    components with more than one face are cut into batches of about ``BATCH_FACES`` faces; every shard
    writes its faces of each batch to ``batches/<batch>/<shard>.parquet``, then each batch is clustered."""
    sizes = np.bincount(components)
    grouped = sizes > 1
    batch_of_component = np.full(len(sizes), -1, dtype=np.int64)
    batch_of_component[grouped] = np.cumsum(sizes[grouped]) // BATCH_FACES
    batch_of_face = batch_of_component[components]
    batches = work / "batches"
    for batch in np.unique(batch_of_face[batch_of_face >= 0]).tolist():
        (batches / str(batch)).mkdir(parents=True)
    lookup = {"face_iids": face_iids, "components": components, "batches": batch_of_face}
    for _ in _map_shards(on_ray, settings, "scatter", shards, str(batches), lookup):
        pass
    leaders = np.arange(len(components))
    for iids, leader_iids in _map_batches(
        on_ray, sorted(batches.iterdir()) if batches.exists() else [], settings["threshold"]
    ):
        leaders[np.searchsorted(face_iids, iids)] = np.searchsorted(face_iids, leader_iids)
    return leaders


def cluster_batch(folder: str, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """``iid`` and leader ``iid`` of the faces of one batch of components (:func:`_leaders_by_component`)."""
    table = pq.read_table(folder).sort_by([("component", "ascending"), ("iid", "ascending")])
    iids = table["iid"].to_numpy()
    components = table["component"].to_numpy()
    vectors = pc.list_flatten(table["embedding"]).to_numpy().reshape(len(iids), -1)
    leader_iids = np.empty_like(iids)
    starts = np.flatnonzero(np.r_[True, components[1:] != components[:-1]])
    for start, stop in zip(starts, np.r_[starts[1:], len(iids)], strict=True):
        leader_iids[start:stop] = iids[start:stop][leaders_in_order(vectors[start:stop], threshold)]
    return iids, leader_iids


def _map_batches(
    on_ray: bool, folders: list[Path], threshold: float
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """:func:`cluster_batch` of every folder, as Ray tasks ``on_ray``."""
    if not on_ray:
        for folder in folders:
            yield cluster_batch(str(folder), threshold)
        return
    task = ray.remote(num_cpus=1)(cluster_batch)
    pending = [task.remote(str(folder), threshold) for folder in folders]
    while pending:
        done, pending = ray.wait(pending)
        yield from ray.get(done)


def _write_decisions(con: duckdb.DuckDBPyConnection, folder: Path, shards: list[str], kept: int) -> None:
    """The decisions of each shard, joined and sorted by DuckDB for about ``BATCH_ROWS`` rows of shards at a
    time (one join and sort over every row outgrows the memory limit at millions of rows)."""
    con.execute(
        """
        CREATE TABLE duplicate_details AS
        SELECT duplicates.rid, duplicates.relation || ' ' || kept_rows.key AS detail
        FROM duplicates JOIN rows AS kept_rows ON kept_rows.rid = duplicates.kept
        """
    )
    per_query = max(1, len(shards) * BATCH_ROWS // max(kept, 1))
    for start in range(0, len(shards), per_query):
        part = shards[start : start + per_query]
        result = con.sql(
            """
            SELECT rows.shard, rows.key,
                   CASE WHEN details.rid IS NOT NULL THEN $reason END AS reject_reason,
                   details.detail AS reject_detail,
                   CASE WHEN clusters.iid IS NOT NULL
                        THEN format('{}-c{:06d}', rows.dataset, clusters.number) END AS identity_cluster
            FROM rows
            LEFT JOIN duplicate_details AS details ON details.rid = rows.rid
            LEFT JOIN clusters ON clusters.iid = rows.iid
            WHERE rows.shard IN (SELECT unnest($shards))
              AND (details.rid IS NOT NULL OR clusters.iid IS NOT NULL)
            ORDER BY rows.shard, rows.key
            """,
            params={"reason": RejectReason.DUPLICATE.value, "shards": part},
        )
        _split_by_shard(result, folder, part, DECISION_SCHEMA)
