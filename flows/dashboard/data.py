"""What a run folder holds, read for the dashboard: step manifests, the Parquet rows of every step's
committed shards (sample records through :class:`~infu.index.DatasetIndex`, other row tables as they
are), image bytes from the shard tars, training ``metrics.jsonl`` and the eval summary.

Every reader copes with a partial run: an absent step, or one still running without a committed shard,
reads as empty, never as an error.
"""

from __future__ import annotations

import io
import json
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import duckdb
import pyarrow.dataset as ds
import pyarrow.parquet as pq
from PIL import Image

from infu.captions import CAPTION_SOURCES
from infu.images import BadImageError, decode_image, extension_for_mime
from infu.index import DatasetIndex, query_rows
from infu.manifest import read_manifest
from infu.shards import TarReader, parquet_paths, tar_paths
from infu.steps import registry

SCHEMA_VERSION_KEY = b"infu_schema_version"
"""The Parquet metadata that marks sample records (:data:`~infu.records.SAMPLE_SCHEMA`, any version)."""
OK = "ok"
"""The outcome of a kept row; a rejected row's outcome is its reject reason."""
OUTCOME = "coalesce(reject_reason, status)"
CAPTION_OUTCOME = (
    f"CASE WHEN coalesce({', '.join(CAPTION_SOURCES)}) IS NULL THEN 'no_caption' ELSE '{OK}' END"
)
"""A caption row is kept when some source has text (as the caption step counts it)."""
WORD_PATTERN = r"\w+(?:['’]\w+)*"
"""A caption's words, as the caption step's statistics count them."""
HISTOGRAM_BINS = 24
THUMBNAIL_SIDE = 160
METRICS_FILE = "metrics.jsonl"
EVAL_REPORT = Path("eval") / "report"


@dataclass(frozen=True)
class Metric:
    """A per-sample quantity with a histogram: its id, title, axis label and SQL over ``samples``."""

    name: str
    title: str
    label: str
    sql: str


LARGEST_FACE = "faces[1]"
"""Faces are stored largest first."""
BBOX_WIDTH = f"{LARGEST_FACE}.bbox[3] - {LARGEST_FACE}.bbox[1]"
BBOX_HEIGHT = f"{LARGEST_FACE}.bbox[4] - {LARGEST_FACE}.bbox[2]"
METRICS = (
    Metric(
        "face_size",
        "Face size",
        "Largest face: shorter bbox side (px)",
        f"least({BBOX_WIDTH}, {BBOX_HEIGHT})",
    ),
    Metric("detection_score", "Detection score", "Largest face: detection score", f"{LARGEST_FACE}.score"),
    Metric("yaw", "Yaw", "Largest face: yaw (degrees)", f"{LARGEST_FACE}.yaw"),
    Metric("pitch", "Pitch", "Largest face: pitch (degrees)", f"{LARGEST_FACE}.pitch"),
    Metric("sharpness", "Sharpness", "Face crop: Laplacian variance", "scores['sharpness']"),
    Metric("aesthetic", "Aesthetics", "Aesthetic score", "scores['aesthetic']"),
    Metric("nsfw", "NSFW", "NSFW score", "scores['nsfw']"),
    Metric("watermark", "Watermark", "Watermark score", "scores['watermark']"),
    Metric(
        "identity_similarity",
        "Identity similarity (SPMS)",
        "Cosine of the face to the reference's (ArcFace or dlib space)",
        "scores['identity_similarity']",
    ),
    Metric(
        "similarity_after_swap",
        "Identity similarity after swap",
        "Cosine of the swapped face to the reference's",
        "scores['similarity_after_swap']",
    ),
    Metric("copy_paste", "Copy-paste", "Face crop correlation with the reference's", "scores['copy_paste']"),
)


class StepTable:
    """The rows of some committed Parquet shards of a step as the SQL view ``samples``.

    Sample records (the schema of :data:`~infu.records.SAMPLE_SCHEMA`, SPMS pairs included) are read
    through :class:`~infu.index.DatasetIndex`; other row tables (captions, cache entries, benchmark
    images, scores) with their own columns. One DuckDB connection serves every query (one at a time).
    """

    def __init__(self, paths: list[Path]):
        self.paths = paths
        schema = pq.read_schema(paths[0])
        self.columns = set(schema.names)
        sample_records = SCHEMA_VERSION_KEY in (schema.metadata or {})
        self.index = DatasetIndex(paths[0].parent) if sample_records else None
        arrow = self.index.dataset if self.index else ds.dataset([str(path) for path in paths])
        self._connection = duckdb.connect()
        self._connection.register("samples", arrow)
        self._lock = threading.Lock()

    @property
    def holds_samples(self) -> bool:
        return self.index is not None

    @property
    def holds_captions(self) -> bool:
        return "flags" in self.columns and "status" not in self.columns

    @property
    def outcome(self) -> str | None:
        """SQL of a row's outcome (``ok`` or why it was dropped), None for a table without one."""
        if "status" in self.columns:
            return OUTCOME
        return CAPTION_OUTCOME if self.holds_captions else None

    @property
    def source(self) -> str:
        """SQL of a row's source: its dataset, a benchmark image's model, else ``all``."""
        for column in ("dataset", "model"):
            if column in self.columns:
                return column
        return "'all'"

    def query(self, sql: str, **params: Any) -> list[dict[str, Any]]:
        """Run SQL against the ``samples`` view; ``$name`` parameters come from ``params``."""
        with self._lock:
            return query_rows(self._connection, sql, params)

    @property
    def has_dataset(self) -> bool:
        return "dataset" in self.columns

    def where(self, dataset: str | None, *conditions: str) -> str:
        """A WHERE clause of ``conditions`` and, when given, the ``$dataset`` filter."""
        if dataset is not None and self.has_dataset:
            conditions = (*conditions, "dataset = $dataset")
        return f" WHERE {' AND '.join(conditions)}" if conditions else ""

    def params(self, dataset: str | None, **params: Any) -> dict[str, Any]:
        return {**params, "dataset": dataset} if dataset is not None and self.has_dataset else params


@dataclass(frozen=True)
class StepState:
    """A step of the pipeline and what its output folder says of it."""

    name: str
    folder: Path
    manifest: dict[str, Any] | None

    @property
    def present(self) -> bool:
        return self.folder.is_dir()

    @property
    def status(self) -> str:
        if not self.present:
            return "missing"
        return (self.manifest or {}).get("status", "no manifest")

    @property
    def seconds(self) -> float | None:
        return ((self.manifest or {}).get("timings") or {}).get("seconds")

    @property
    def counts(self) -> dict[str, Any]:
        return (self.manifest or {}).get("counts") or {}


@dataclass(frozen=True)
class DatasetCount:
    """Rows of one step, source (dataset, or model for benchmark images) and outcome."""

    step: str
    dataset: str
    outcome: str
    count: int


@dataclass(frozen=True)
class Histogram:
    """A metric's value counts over one step's rows: ``counts[outcome][bin]`` for bins ``edges[i]`` to
    ``edges[i + 1]`` (the last bin includes its upper edge)."""

    step: str
    metric: Metric
    edges: list[float]
    counts: dict[str, list[int]]

    @property
    def total(self) -> int:
        return sum(sum(counts) for counts in self.counts.values())


@dataclass(frozen=True)
class CaptionSummary:
    """The caption step's rows: per source the stored, dropped (the checks removed it) and missing
    captions, stored captions per word count, and flags per source."""

    sources: dict[str, dict[str, int]]
    lengths: list[dict[str, Any]]
    flags: list[dict[str, Any]]


@dataclass(frozen=True)
class Thumbnail:
    """A row shown as a thumbnail: its source (dataset, or model for benchmark images), outcome, and
    where its image is."""

    step: str
    key: str
    dataset: str
    outcome: str
    detail: str | None
    shard: str | None
    mime: str | None


@dataclass(frozen=True)
class ThumbnailPage:
    total: int
    items: list[Thumbnail] = field(default_factory=list)


def _outcome_order(counts: dict[str, int]) -> dict[str, int]:
    """``ok`` first, then the reasons, most frequent first."""
    return dict(sorted(counts.items(), key=lambda item: (item[0] != OK, -item[1], item[0])))


class RunData:
    """One run folder, read for the dashboard: each call reads what is committed now (a step's table is
    reused while its committed shards stay the same)."""

    def __init__(self, run_dir: Path):
        self.run_dir = Path(run_dir)
        self.specs = registry()
        self._tables: dict[str, StepTable] = {}
        self._tars: dict[Path, TarReader] = {}

    def steps(self) -> list[StepState]:
        """Every registered step in pipeline order, present or not."""
        return [
            StepState(name, self.run_dir / name, read_manifest(self.run_dir / name)) for name in self.specs
        ]

    def present_steps(self) -> list[str]:
        return [state.name for state in self.steps() if state.present]

    def missing_steps(self) -> list[str]:
        return [state.name for state in self.steps() if not state.present]

    def table(self, step: str) -> StepTable | None:
        """The step's committed rows, None when the step has no committed Parquet shard."""
        paths = parquet_paths(self.run_dir / step)
        if not paths:
            return None
        if step not in self._tables or self._tables[step].paths != paths:
            self._tables[step] = StepTable(paths)
        return self._tables[step]

    def funnel(self, dataset: str | None = None) -> dict[str, dict[str, int]]:
        """Step -> outcome (``ok`` or the reject reason) -> rows, for every step with committed rows (of
        ``dataset`` only, when given: steps without a dataset column are left out)."""
        return {step: counts for step in self.present_steps() if (counts := self.outcomes(step, dataset))}

    def outcomes(self, step: str, dataset: str | None = None) -> dict[str, int]:
        """Rows of ``step`` per outcome, kept first, then the most frequent reasons; empty without rows."""
        table = self.table(step)
        if table is None or table.outcome is None or (dataset is not None and not table.has_dataset):
            return {}
        rows = table.query(
            f"SELECT {table.outcome} AS outcome, count(*) AS n FROM samples{table.where(dataset)} GROUP BY 1",
            **table.params(dataset),
        )
        return _outcome_order({row["outcome"]: row["n"] for row in rows})

    def funnel_by_dataset(self) -> list[DatasetCount]:
        """Rows per step, source (dataset, or model for benchmark images) and outcome."""
        counts = []
        for step in self.present_steps():
            table = self.table(step)
            if table is None or table.outcome is None:
                continue
            rows = table.query(
                f"SELECT coalesce(CAST({table.source} AS VARCHAR), '(none)') AS dataset,"
                f" {table.outcome} AS outcome, count(*) AS n FROM samples"
                " GROUP BY 1, 2 ORDER BY 1, (outcome <> 'ok'), 3 DESC, 2"
            )
            counts += [DatasetCount(step, row["dataset"], row["outcome"], row["n"]) for row in rows]
        return counts

    def datasets(self) -> list[str]:
        """The source datasets of the run's sample records."""
        found: set[str] = set()
        for step in self.present_steps():
            table = self.table(step)
            if table is not None and table.has_dataset:
                found |= {row["dataset"] for row in table.query("SELECT DISTINCT dataset FROM samples")}
        return sorted(name for name in found if name is not None)

    def histogram_steps(self) -> list[str]:
        """The steps whose rows are sample records (they carry faces and scores)."""
        return [step for step in self.present_steps() if (table := self.table(step)) and table.holds_samples]

    def histograms(self, step: str, dataset: str | None = None) -> list[Histogram]:
        """The histograms of the :data:`METRICS` that some row of ``step`` has a value for."""
        table = self.table(step)
        if table is None or not table.holds_samples:
            return []
        return [
            histogram
            for metric in METRICS
            if (histogram := self._histogram(table, step, metric, dataset)) is not None
        ]

    @staticmethod
    def _histogram(table: StepTable, step: str, metric: Metric, dataset: str | None) -> Histogram | None:
        """``metric``'s finite values over ``step``'s rows in :data:`HISTOGRAM_BINS` bins, by outcome."""
        values = (
            f"SELECT CAST({metric.sql} AS DOUBLE) AS value, {OUTCOME} AS outcome FROM samples"
            f"{table.where(dataset)}"
        )
        finite = f"FROM ({values}) WHERE isfinite(value)"
        params = table.params(dataset)
        (extent,) = table.query(
            f"SELECT min(value) AS low, max(value) AS high, count(*) AS n {finite}", **params
        )
        if not extent["n"]:
            return None
        low, high = extent["low"], extent["high"]
        width = (high - low) / HISTOGRAM_BINS if high > low else 1.0
        bins = HISTOGRAM_BINS if high > low else 1
        rows = table.query(
            f"SELECT outcome, least(CAST(floor((value - $low) / $width) AS INTEGER), $last) AS bin,"
            f" count(*) AS n {finite} GROUP BY 1, 2",
            **params,
            low=low,
            width=width,
            last=bins - 1,
        )
        counts: dict[str, list[int]] = {}
        for row in rows:
            counts.setdefault(row["outcome"], [0] * bins)[row["bin"]] = row["n"]
        ordered = _outcome_order({outcome: sum(values) for outcome, values in counts.items()})
        edges = [low + width * index for index in range(bins)] + [low + width if bins == 1 else high]
        return Histogram(step, metric, edges, {outcome: counts[outcome] for outcome in ordered})

    def caption_summary(self, dataset: str | None = None) -> CaptionSummary | None:
        """The caption step's rows, or None when the run has none."""
        table = self.table("caption")
        if table is None or not table.holds_captions:
            return None
        params = table.params(dataset)
        where = table.where(dataset)
        sources: dict[str, dict[str, int]] = {}
        lengths: list[dict[str, Any]] = []
        for source in CAPTION_SOURCES:
            flagged = f"coalesce(len(flags['{source}']), 0) > 0"
            (row,) = table.query(
                f"SELECT count({source}) AS stored,"
                f" count(*) FILTER (WHERE {source} IS NULL AND {flagged}) AS dropped,"
                f" count(*) FILTER (WHERE {source} IS NULL AND NOT {flagged}) AS missing"
                f" FROM samples{where}",
                **params,
            )
            if row["stored"] or row["dropped"]:
                sources[source] = row
                lengths += [
                    {"source": source, **length}
                    for length in table.query(
                        f"SELECT len(regexp_extract_all(lower({source}), $pattern)) AS words,"
                        f" count(*) AS captions FROM samples{table.where(dataset, f'{source} IS NOT NULL')}"
                        " GROUP BY 1 ORDER BY 1",
                        **params,
                        pattern=WORD_PATTERN,
                    )
                ]
        flags = table.query(
            "SELECT source, flag, count(*) AS count FROM ("
            " SELECT entry.key AS source, unnest(entry.value) AS flag FROM ("
            f"  SELECT unnest(map_entries(flags)) AS entry FROM samples{where}))"
            " GROUP BY 1, 2 ORDER BY 1, 3 DESC, 2",
            **params,
        )
        return CaptionSummary(sources, lengths, flags)

    def buckets(self, dataset: str | None = None) -> list[dict[str, Any]]:
        """Kept samples per aspect-ratio bucket (``bucket_width`` x ``bucket_height``) of each step."""
        counts = []
        for step in self.present_steps():
            table = self.table(step)
            if table is None or not table.holds_samples:
                continue
            rows = table.query(
                "SELECT bucket_width AS width, bucket_height AS height, count(*) AS samples FROM samples"
                f"{table.where(dataset, f'status = {OK!r}', 'bucket_width IS NOT NULL')}"
                " GROUP BY 1, 2 ORDER BY bucket_width / bucket_height, bucket_width",
                **table.params(dataset),
            )
            counts += [{"step": step, **row} for row in rows]
        return counts

    def training_curves(self) -> dict[str, list[dict[str, Any]]]:
        """Step -> the lines of its ``metrics.jsonl`` (one per optimiser step), for steps that train."""
        curves = {}
        for step in self.present_steps():
            path = self.run_dir / step / METRICS_FILE
            if path.is_file():
                lines = path.read_text().splitlines()
                curves[step] = [json.loads(line) for line in lines if line.strip()]
        return curves

    def eval_summary(self) -> dict[str, Any] | None:
        """The eval step's ``report/summary.json``: benchmark and per-model metrics."""
        path = self.run_dir / EVAL_REPORT / "summary.json"
        return json.loads(path.read_text()) if path.is_file() else None

    def eval_scores(self) -> list[dict[str, Any]]:
        """The eval step's per-image scores (``report/scores.parquet``)."""
        path = self.run_dir / EVAL_REPORT / "scores.parquet"
        return pq.read_table(path).to_pylist() if path.is_file() else []

    def image_steps(self) -> list[str]:
        """Steps whose shard tars hold images: rows with an outcome and an image format (``mime``)."""
        return [
            step
            for step in self.present_steps()
            if (table := self.table(step)) is not None
            and table.outcome is not None
            and "mime" in table.columns
            and any(path.is_file() for path in tar_paths(self.run_dir / step))
        ]

    def thumbnails(
        self,
        step: str,
        outcome: str | None = None,
        dataset: str | None = None,
        offset: int = 0,
        limit: int = 24,
    ) -> ThumbnailPage:
        """A page of ``step``'s rows (kept first, then by reason and key), maybe of one outcome/dataset."""
        table = self.table(step)
        if table is None or table.outcome is None or "mime" not in table.columns:
            return ThumbnailPage(0)
        conditions = (f"{table.outcome} = $outcome",) if outcome is not None else ()
        where = table.where(dataset, *conditions)
        params = table.params(dataset, **({"outcome": outcome} if outcome is not None else {}))
        (count,) = table.query(f"SELECT count(*) AS n FROM samples{where}", **params)
        rows = table.query(
            f"{self._thumbnail_columns(table)}{where}"
            " ORDER BY (outcome <> 'ok'), outcome, key LIMIT $limit OFFSET $offset",
            **params,
            limit=limit,
            offset=offset,
        )
        return ThumbnailPage(count["n"], [Thumbnail(step, **row) for row in rows])

    def thumbnail(self, step: str, key: str) -> Thumbnail | None:
        """The row ``key`` of ``step`` as a thumbnail, None when the step has no such row with images."""
        table = self.table(step)
        if table is None or table.outcome is None or "mime" not in table.columns:
            return None
        rows = table.query(f"{self._thumbnail_columns(table)} WHERE key = $key LIMIT 1", key=key)
        return Thumbnail(step, **rows[0]) if rows else None

    @staticmethod
    def _thumbnail_columns(table: StepTable) -> str:
        return (
            f"SELECT key, CAST({table.source} AS VARCHAR) AS dataset, {table.outcome} AS outcome,"
            " reject_detail AS detail, shard, mime FROM samples"
        )

    def image_member(self, item: Thumbnail) -> tuple[TarReader, str] | None:
        """Where a row's image is: its step's shard tar, else the tar of the same shard upstream (a
        rejected row's image stays where the step read it); None when no tar holds it."""
        if item.shard is None or item.mime is None:
            return None
        member = f"{item.key}.{extension_for_mime(item.mime)}"
        for folder in (item.step, *self.specs[item.step].upstream):
            tar = self.run_dir / folder / f"{item.shard}.tar"
            if not tar.is_file():
                continue
            if tar not in self._tars:
                self._tars[tar] = TarReader(tar)
            if member in self._tars[tar].members:
                return self._tars[tar], member
        return None

    def image_bytes(self, item: Thumbnail) -> bytes | None:
        """A row's original image bytes, None when no tar holds them."""
        found = self.image_member(item)
        return found[0].read(found[1]) if found else None

    def thumbnail_jpeg(self, item: Thumbnail) -> bytes | None:
        """A row's image fitted in :data:`THUMBNAIL_SIDE` px, as JPEG; None without a decodable image."""
        data = self.image_bytes(item)
        if data is None:
            return None
        try:
            image = decode_image(data, min_size=(THUMBNAIL_SIDE, THUMBNAIL_SIDE))
        except BadImageError:
            return None
        image.thumbnail((THUMBNAIL_SIDE, THUMBNAIL_SIDE), Image.Resampling.LANCZOS)
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=82)
        return buffer.getvalue()
