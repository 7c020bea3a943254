"""Identity guard (held-out people never enter the training data) and per-dataset identity clusters.

Embeddings are L2-normalised face embeddings (128-D dlib, 512-D ArcFace), so cosine similarity is a dot
product. Similarities are computed in blocks of matrix products: memory stays bounded by
``_BLOCK x _BLOCK`` floats however many faces or references there are.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.compute as pc

from infu.face import FaceAnalyzer
from infu.face.base import normalize_rows
from infu.face.recognizer import SAME_IDENTITY_SIMILARITY

_BLOCK = 4096


def _best_match(queries: np.ndarray, blocks: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Per query the highest similarity over the reference blocks (-1 with none) and its index (-1).

    Ties go to the earliest reference."""
    best_similarity = np.full(len(queries), -1.0, dtype=np.float32)
    best_index = np.full(len(queries), -1, dtype=np.int64)
    offset = 0
    for block in blocks:
        for start in range(0, len(queries), _BLOCK):
            rows = slice(start, start + _BLOCK)
            similarities = queries[rows] @ block.T
            column = similarities.argmax(axis=1)
            value = similarities[np.arange(len(column)), column]
            better = value > best_similarity[rows]
            best_similarity[rows] = np.where(better, value, best_similarity[rows])
            best_index[rows] = np.where(better, column + offset, best_index[rows])
        offset += len(block)
    return best_similarity, best_index


class _LeaderBank:
    """Leader embeddings in blocks of at most ``_BLOCK`` rows."""

    def __init__(self) -> None:
        self.blocks: list[np.ndarray] = []
        self.count = 0

    def add(self, vectors: np.ndarray) -> None:
        while len(vectors):
            if self.blocks and len(self.blocks[-1]) < _BLOCK:
                room = _BLOCK - len(self.blocks[-1])
                self.blocks[-1] = np.concatenate([self.blocks[-1], vectors[:room]])
            else:
                room = _BLOCK
                self.blocks.append(np.array(vectors[:room], dtype=np.float32))
            self.count += min(room, len(vectors))
            vectors = vectors[room:]


@dataclass(frozen=True, eq=False)
class HeldOutIdentities:
    """People whose faces must not be trained on (e.g. the evaluation identities)."""

    names: np.ndarray
    """(k,) object: the identity of each reference embedding (a person may have several)."""
    embeddings: np.ndarray
    """(k, D) float32, L2-normalised."""
    embedding_space: str = "dlib"
    """Recognizer that made the embeddings: picks the default threshold."""

    @classmethod
    def from_embeddings(
        cls, names: Sequence[str], embeddings: npt.ArrayLike, embedding_space: str = "dlib"
    ) -> HeldOutIdentities:
        matrix = normalize_rows(embeddings) if len(names) else np.empty((0, 0), dtype=np.float32)
        if len(matrix) != len(names):
            raise ValueError(f"{len(names)} names for {len(matrix)} embeddings")
        return cls(np.array(names, dtype=object), matrix, embedding_space)

    @classmethod
    def from_images(
        cls, analyzer: FaceAnalyzer, paths_by_name: Mapping[str, Path | str | Sequence[Path | str]]
    ) -> HeldOutIdentities:
        """One reference per photo: the largest face (:class:`~infu.face.NoFaceError` if a photo has none)."""
        names: list[str] = []
        embeddings: list[np.ndarray] = []
        for name, paths in paths_by_name.items():
            for path in [paths] if isinstance(paths, (str, Path)) else paths:
                embeddings.append(analyzer.require_largest(Path(path)).embedding)
                names.append(name)
        return cls.from_embeddings(names, embeddings, analyzer.embedding_space)

    @property
    def default_threshold(self) -> float:
        return SAME_IDENTITY_SIMILARITY[self.embedding_space]

    def match(
        self, embeddings: npt.ArrayLike, threshold: float | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Per face: the most similar held-out name if its cosine >= ``threshold`` (else None), and that
        highest cosine (-1 when there are no references). ``threshold`` defaults per embedding space."""
        threshold = self.default_threshold if threshold is None else threshold
        queries = normalize_rows(embeddings)
        blocks = [self.embeddings[start : start + _BLOCK] for start in range(0, len(self.embeddings), _BLOCK)]
        similarities, indices = _best_match(queries, blocks)
        names = np.full(len(queries), None, dtype=object)
        matched = (similarities >= threshold) & (indices >= 0)
        names[matched] = self.names[indices[matched]]
        return names, similarities


def cluster_identities(
    keys: Sequence[str], embeddings: npt.ArrayLike, threshold: float, *, dataset: str
) -> list[str]:
    """Identity cluster id per face, ``<dataset>-c000123``, by greedy leader clustering.

    Faces are visited in key order (so ids do not depend on the row order): a face joins the most
    similar earlier leader with cosine >= ``threshold``, otherwise it becomes a new leader. Every member
    is within ``threshold`` of its leader, so unlike single-link clustering a chain of look-alikes does
    not merge different people. Clusters are numbered in the order their leaders appear. Work is
    faces x leaders dot products, done in blocks of matrix products.
    """
    matrix = np.asarray(embeddings, dtype=np.float32)
    if len(matrix) != len(keys):
        raise ValueError(f"{len(keys)} keys for {len(matrix)} embeddings")
    if not len(keys):
        return []
    order = pc.sort_indices(pa.array(keys, type=pa.string())).to_numpy()
    leaders = leaders_in_order(matrix[order], threshold)
    numbers = np.cumsum(leaders == np.arange(len(keys))) - 1
    clusters = np.empty(len(keys), dtype=np.int64)
    clusters[order] = numbers[leaders]
    return [f"{dataset}-c{cluster:06d}" for cluster in clusters]


def leaders_in_order(embeddings: npt.ArrayLike, threshold: float) -> np.ndarray:
    """Greedy leader clustering of faces in the given order: per face the position of its leader (its
    own position for leaders). See :func:`cluster_identities`."""
    matrix = np.asarray(embeddings, dtype=np.float32)
    leader_of = np.empty(len(matrix), dtype=np.int64)
    leaders = _LeaderBank()
    leader_positions: list[np.ndarray] = []
    for start in range(0, len(matrix), _BLOCK):
        chunk = normalize_rows(matrix[start : start + _BLOCK])
        best_similarity, best_leader = _best_match(chunk, leaders.blocks)
        new_leaders = _new_leaders(chunk, best_similarity < threshold, threshold)
        # Each face may prefer a leader created earlier in this chunk over the best older one.
        to_new = chunk @ chunk[new_leaders].T
        to_new[np.arange(len(chunk))[:, None] < new_leaders[None, :]] = -np.inf
        if len(new_leaders):
            column = to_new.argmax(axis=1)
            prefer_new = to_new[np.arange(len(chunk)), column] > best_similarity
            best_leader = np.where(prefer_new, leaders.count + column, best_leader)
            best_leader[new_leaders] = leaders.count + np.arange(len(new_leaders))
        leader_of[start : start + len(chunk)] = best_leader
        leaders.add(chunk[new_leaders])
        leader_positions.append(start + new_leaders)
    return np.concatenate(leader_positions)[leader_of] if len(matrix) else leader_of


def _new_leaders(chunk: np.ndarray, unmatched: np.ndarray, threshold: float) -> np.ndarray:
    """Chunk positions that become leaders: unmatched by older leaders and by earlier ones in the chunk."""
    candidates = np.flatnonzero(unmatched)
    similarities = chunk[candidates] @ chunk[candidates].T
    covered = np.zeros(len(candidates), dtype=bool)
    leaders = []
    for position in range(len(candidates)):
        if covered[position]:
            continue
        leaders.append(candidates[position])
        covered[position + 1 :] |= similarities[position, position + 1 :] >= threshold
    return np.array(leaders, dtype=np.int64)
