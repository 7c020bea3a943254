"""The data-quality dashboard of a run: a self-contained HTML snapshot per run, and a server to explore it.

Both are built from what the run folder holds (each step's Parquet shards, manifests, training
``metrics.jsonl``, the eval summary), whatever steps it has.
"""

from flows.dashboard.server import create_app, serve
from flows.dashboard.snapshot import snapshot_path, write_snapshot

__all__ = ["create_app", "serve", "snapshot_path", "write_snapshot"]
