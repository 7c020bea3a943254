"""Dataset index over a step's Parquet sidecars: queries (DuckDB) and stats (pyarrow.dataset)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa
import pyarrow.dataset as ds

from infu.records import SAMPLE_SCHEMA
from infu.shards import parquet_paths


def query_rows(
    connection: duckdb.DuckDBPyConnection, sql: str, params: dict[str, Any]
) -> list[dict[str, Any]]:
    """Run ``sql`` (``$name`` parameters from ``params``) on ``connection``; the rows as dicts by column."""
    result = connection.execute(sql, params or None)
    names = [column[0] for column in result.description]
    return [dict(zip(names, row, strict=True)) for row in result.fetchall()]


class DatasetIndex:
    """All committed shards of one or more step output folders, as one table named ``samples``."""

    def __init__(self, *out_dirs: Path):
        self.paths = [str(path) for out_dir in out_dirs for path in parquet_paths(Path(out_dir))]
        self.dataset = ds.dataset(self.paths, schema=SAMPLE_SCHEMA, format="parquet")

    def table(self, columns: list[str] | None = None) -> pa.Table:
        return self.dataset.to_table(columns=columns)

    def count(self) -> int:
        return self.dataset.count_rows()

    def query(self, sql: str, **params: Any) -> list[dict[str, Any]]:
        """Run SQL against the ``samples`` view; ``$name`` parameters come from ``params``."""
        with duckdb.connect() as connection:
            connection.register("samples", self.dataset)
            return query_rows(connection, sql, params)

    def reason_counts(self) -> dict[str, int]:
        """Samples per outcome: ``ok`` or the reject reason."""
        rows = self.query(
            "SELECT coalesce(reject_reason, status) AS outcome, count(*) AS n"
            " FROM samples GROUP BY 1 ORDER BY 1"
        )
        return {row["outcome"]: row["n"] for row in rows}

    def duplicate_keys(self) -> list[str]:
        rows = self.query("SELECT key FROM samples GROUP BY key HAVING count(*) > 1 ORDER BY key")
        return [row["key"] for row in rows]
