"""The training data: kept samples in aspect-ratio buckets, planned into batches from their metadata
alone, then read, decoded and cropped on the worker that trains on them. One planner and loader
(:class:`PlannedSamples`) serves both sources; they differ only in where a sample's caption and
identity embedding come from.

**Plan.** Every worker computes the same plan from the Parquet columns of the source's shards (no image
is read): per epoch the shards are shuffled (seeded by ``shuffle_seed`` and the epoch), then each shard's
samples; a sample joins the buffer of its bucket, and a full buffer (``global_batch`` samples) is one
optimiser step's *global batch*. It is cut into slices of ``micro_batch`` samples: worker ``r`` takes slice
``m x workers + r`` as its micro batch ``m``, so the plan and the slices do not depend on the worker
count. The plan's position is the number of global batches consumed (the step), so a resumed run skips
exactly what the killed one trained on, reading
metadata only. Samples left in a bucket's buffer at the end of an epoch are counted
(:attr:`EpochPlan.left_over`): they meet other samples in the next epoch's order.

**Sample.** The target is the shard's image ``<key>.<ext>``; the control image draws the target's five
keypoints (its largest face), mapped through the same resize-and-crop as the image, or is black with
probability ``control_dropout``; ``empty_prompts`` trains without text. With a precompute cache
(:meth:`PlannedSamples.use_cache`, :mod:`training.cache`), a micro batch whose samples all have entries
carries their latent distributions instead of images (no decoding), and a sample's caption embeddings
when cached.

* Stage 1, SPSS (:class:`TrainingSamples`: the filter's shards and the caption step's): the reference
  face is the target's own (its identity embedding, from the filter's record); the caption is drawn by
  the :class:`~infu.captions.CaptionMixture` (its ``empty_rate`` is the caption dropout).
  Identity-enhanced training (Infinite-ID): ``reference: same_identity`` takes the identity embedding
  from another photo of the target's person (its dataset identity label where the dataset has one,
  else its filter identity cluster; drawn per epoch; a sample alone keeps its own).
* Stage 2, SPMS (:class:`PairSamples`: the ``spms`` step's pair shards, :mod:`infu.pairs`): the target
  is the synthetic image, the identity embedding the real reference's (``reference_embedding``), the
  caption the prompt the synthetic image was made from.
"""

from __future__ import annotations

import functools
import queue
import random
import threading
from abc import ABC, abstractmethod
from collections import Counter, defaultdict
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import torch
from PIL import Image

from infu.captions import CaptionMixture, read_caption_rows
from infu.draws import stable_uniform
from infu.face.control import black_control, draw_keypoints_control
from infu.images import decode_image
from infu.model.conditioning import aligned_face_pixels
from infu.model.config import LATENT_PIXEL_MULTIPLE
from infu.pairs import read_pair_records
from infu.records import Status
from infu.shards import InputImages, committed_shards, read_parquet_records
from infu.steps import StepError
from training.cache import EncodedCache, Entry
from training.config import DataConfig, TrainConfig

PLAN_COLUMNS = [
    "key",
    "dataset",
    "status",
    "bucket_width",
    "bucket_height",
    "face_embedding_space",
    "identity",
    "identity_cluster",
]


@dataclass(frozen=True)
class SampleRef:
    """A planned sample: where it is and the size it trains at (width, height)."""

    shard: str
    key: str
    size: tuple[int, int]
    identity: str | None = None
    """Who it shows: the dataset's identity label where the dataset has one, else the filter's identity
    cluster."""


@dataclass
class EpochPlan:
    """What an epoch's plan held: its global batches and the samples no batch took."""

    batches: int = 0
    left_over: Counter[tuple[int, int]] = field(default_factory=Counter)


def scaled_bucket(width: int, height: int, max_side: int | None) -> tuple[int, int]:
    """A bucket scaled down (aspect kept) so its longer side is at most ``max_side``, in multiples of 16."""
    if max_side is None or max(width, height) <= max_side:
        return width, height
    scale = max_side / max(width, height)

    def side(value: int) -> int:
        return max(
            LATENT_PIXEL_MULTIPLE, round(value * scale / LATENT_PIXEL_MULTIPLE) * LATENT_PIXEL_MULTIPLE
        )

    return side(width), side(height)


def cover_crop(size: tuple[int, int], target: tuple[int, int]) -> tuple[float, float, float]:
    """Scale and (left, top) offset that resize ``size`` to cover ``target`` and centre-crop it."""
    (width, height), (target_width, target_height) = size, target
    scale = max(target_width / width, target_height / height)
    return scale, (width * scale - target_width) / 2, (height * scale - target_height) / 2


def to_pixels(image: Image.Image) -> torch.Tensor:
    """RGB image -> ``[3, H, W]`` float in [-1, 1] (the VAE's input range)."""
    array = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy())
    return array.permute(2, 0, 1).float().div(127.5).sub(1.0)


def bucket_images(
    data: bytes, record: dict[str, Any], size: tuple[int, int]
) -> tuple[Image.Image, Image.Image | None]:
    """A sample's image bytes -> its target at ``size`` (resized to cover it, centre-cropped) and the
    control image of the target's five keypoints (its largest face), mapped through the same resize and
    crop; None without a face."""
    image = decode_image(data, min_size=size)
    scale, left, top = cover_crop(image.size, size)
    decoded_scale = image.width / record["width"]  # keypoints are in the original's pixels
    resized = (round(image.width * scale), round(image.height * scale))
    width, height = size
    crop = (round(left), round(top), round(left) + width, round(top) + height)
    target = image.resize(resized, Image.Resampling.BICUBIC).crop(crop)
    faces = record["faces"]  # largest first: the face of the identity embedding
    if not faces:
        return target, None
    kps = np.asarray(faces[0]["keypoints"], dtype=np.float32).reshape(5, 2)
    offset = np.array([round(left), round(top)])
    return target, draw_keypoints_control(size, kps * decoded_scale * scale - offset)


class PlannedSamples(ABC):
    """Kept samples with a face embedding in the committed shards of ``shards_dir``, the deterministic
    batch plan over them, and their loading; a subclass says where a sample's caption and identity
    embedding come from."""

    producer = ""
    """The step writing the shards (named when they are missing)."""

    def __init__(
        self,
        shards_dir: Path,
        data: DataConfig,
        embedding_space: str,
        global_batch: int,
        reference_faces: int | None = None,
    ):
        self.shards_dir = Path(shards_dir)
        self.data = data
        self.embedding_space = embedding_space
        self.global_batch = global_batch
        self.reference_faces = reference_faces
        """Side of the aligned reference face crop each sample carries (None: no crop)."""
        self.shards = committed_shards(self.shards_dir)
        if not self.shards:
            raise StepError(f"no committed shards in {self.shards_dir}: run the {self.producer} step first")
        self.images = InputImages()
        self.cache: EncodedCache | None = None

    # what a source defines ----------------------------------------------------------------------------

    @abstractmethod
    def read_records(self, path: Path) -> list[dict[str, Any]]:
        """The rows of one shard's Parquet file."""

    @abstractmethod
    def identity_embedding(self, record: dict[str, Any]) -> list[float]:
        """The identity embedding a row gives to the samples it is the reference of."""

    @abstractmethod
    def caption(self, ref: SampleRef, record: dict[str, Any], epoch: int) -> str:
        """The caption ``ref`` trains with in ``epoch``."""

    def reference_of(self, ref: SampleRef, epoch: int) -> SampleRef:
        """The sample whose row gives ``ref``'s identity embedding: itself."""
        return ref

    # the plan -----------------------------------------------------------------------------------------

    @functools.cache  # noqa: B019 - one plan index per shard, kept for the run
    def shard_refs(self, shard: str) -> tuple[SampleRef, ...]:
        """The trainable samples of a shard, from its metadata columns."""
        table = pq.read_table(self.shards_dir / f"{shard}.parquet", columns=PLAN_COLUMNS).to_pylist()
        refs = []
        for row in table:
            if row["status"] != Status.OK or row["bucket_width"] is None:
                continue
            if row["face_embedding_space"] != self.embedding_space:
                raise StepError(
                    f"sample {row['key']} in {self.shards_dir}/{shard} has a {row['face_embedding_space']} "
                    f"face embedding, but the projection takes {self.embedding_space} embeddings "
                    f"(face.recognizer of the {self.producer} run vs model.projection.embedding_space)"
                )
            size = scaled_bucket(row["bucket_width"], row["bucket_height"], self.data.max_side)
            labelled = row["identity"] is not None
            identity = f"{row['dataset']}/{row['identity']}" if labelled else row["identity_cluster"]
            refs.append(SampleRef(shard, row["key"], size, identity))
        return tuple(refs)

    def trainable(self) -> list[SampleRef]:
        """Every trainable sample, in shard order."""
        return [ref for shard in self.shards for ref in self.shard_refs(shard)]

    def epoch(self, epoch: int, plan: EpochPlan | None = None) -> Iterator[list[SampleRef]]:
        """The global batches of ``epoch`` (same-size samples each), in plan order."""
        order = random.Random(f"{self.data.shuffle_seed}:{epoch}")
        shards = list(self.shards)
        order.shuffle(shards)
        buffers: dict[tuple[int, int], list[SampleRef]] = defaultdict(list)
        for shard in shards:
            refs = list(self.shard_refs(shard))
            order.shuffle(refs)
            for ref in refs:
                buffer = buffers[ref.size]
                buffer.append(ref)
                if len(buffer) == self.global_batch:
                    if plan is not None:
                        plan.batches += 1
                    yield list(buffer)
                    buffer.clear()
        if plan is not None:
            plan.left_over.update({size: len(buffer) for size, buffer in buffers.items() if buffer})

    def global_batches(self, start: int = 0) -> Iterator[tuple[int, list[SampleRef]]]:
        """``(epoch, batch)`` forever, epoch after epoch, from position ``start`` (batches already
        consumed); a dataset with no bucket able to fill one batch is a :class:`StepError`."""
        position, epoch = 0, 0
        while True:
            plan = EpochPlan()
            for batch in self.epoch(epoch, plan):
                if position >= start:
                    yield epoch, batch
                position += 1
            self.require_batches(plan)
            epoch += 1

    def require_batches(self, plan: EpochPlan) -> None:
        """A :class:`StepError` when an epoch's plan holds no batch: no bucket fills ``global_batch``."""
        if plan.batches == 0:
            raise StepError(
                f"no aspect-ratio bucket holds {self.global_batch} trainable samples "
                f"(global_batch); samples per bucket: {dict(plan.left_over)}"
            )

    def summary(self) -> dict[str, Any]:
        """Samples per bucket and those an epoch cannot batch (for the manifest); a :class:`StepError`
        when no batch can be made."""
        plan = EpochPlan()
        for _ in self.epoch(0, plan):
            pass
        self.require_batches(plan)
        sizes = Counter(ref.size for ref in self.trainable())
        return {
            "trainable_samples": sum(sizes.values()),
            "buckets": {f"{width}x{height}": count for (width, height), count in sorted(sizes.items())},
            "global_batches_per_epoch": plan.batches,
            "left_over_per_epoch": sum(plan.left_over.values()),
        }

    def validation_references(self, count: int) -> list[SampleRef]:
        """The first ``count`` trainable samples by key: the identities validation images show."""
        return sorted(self.trainable(), key=lambda ref: ref.key)[:count]

    def unit_embeddings(self, refs: list[SampleRef]) -> torch.Tensor:
        """``[len(refs), D]``: the unit identity embeddings the rows of ``refs`` give."""
        embeddings = [self.identity_embedding(self.shard_records(ref.shard)[ref.key]) for ref in refs]
        return torch.nn.functional.normalize(torch.tensor(embeddings, dtype=torch.float32), dim=-1)

    def reference_face(self, ref: SampleRef) -> torch.Tensor:
        """``[3, S, S]`` in [0, 1]: the ArcFace-aligned crop (``reference_faces`` px) of ``ref``'s largest
        face, from its keypoints, as the Infinite-ID pipeline crops an identity photo."""
        record = self.shard_records(ref.shard)[ref.key]
        image = decode_image(self.images.read({"record": record, "tar": self.tar(ref)}))
        kps = np.asarray(record["faces"][0]["keypoints"], dtype=np.float32).reshape(5, 2)
        return aligned_face_pixels(
            np.asarray(image), kps * (image.width / record["width"]), self.reference_faces
        )

    def tar(self, ref: SampleRef) -> str:
        return str(self.shards_dir / f"{ref.shard}.tar")

    # reading samples ----------------------------------------------------------------------------------

    @functools.lru_cache(maxsize=4)  # noqa: B019
    def shard_records(self, shard: str) -> dict[str, dict[str, Any]]:
        return {record["key"]: record for record in self.read_records(self.shards_dir / f"{shard}.parquet")}

    def load(self, ref: SampleRef, epoch: int, entry: Entry | None = None) -> dict[str, Any]:
        """One training sample: caption, identity embedding, and the target and control images, or their
        cached latent distributions from ``entry`` (a black control's left to the objective: None)."""
        record = self.shard_records(ref.shard)[ref.key]
        dropped = (
            stable_uniform(self.data.shuffle_seed, ref.key, epoch, "control") < self.data.control_dropout
        )
        reference = self.reference_of(ref, epoch)
        embedding = self.identity_embedding(self.shard_records(reference.shard)[reference.key])
        prompt = "" if self.data.empty_prompts else self.caption(ref, record, epoch)
        sample: dict[str, Any] = {
            "key": ref.key,
            "prompt": prompt,
            "id_embedding": torch.tensor(embedding, dtype=torch.float32),
            "text": entry.text(prompt) if entry is not None and prompt else None,
        }
        if self.reference_faces is not None:
            sample["reference_face"] = self.reference_face(reference)
        if entry is not None and entry.latent is not None:
            sample["latent_parameters"] = entry.latent
            sample["control_parameters"] = None if dropped else entry.control
            return sample
        data = self.images.read({"record": record, "tar": self.tar(ref)})
        target, control = bucket_images(data, record, ref.size)
        sample["pixels"] = to_pixels(target)
        sample["control"] = to_pixels(black_control(ref.size) if dropped or control is None else control)
        return sample

    def batch(self, refs: list[SampleRef], epoch: int) -> dict[str, Any]:
        """A micro batch (same-size samples); from the cache when every sample's latents are in it."""
        entries = [self.cached(ref) for ref in refs]
        if any(entry is None or entry.latent is None for entry in entries):
            entries = [entry and Entry(None, None, entry.texts) for entry in entries]
        samples = [self.load(ref, epoch, entry) for ref, entry in zip(refs, entries, strict=True)]
        width, height = refs[0].size
        batch = {
            "keys": [sample["key"] for sample in samples],
            "size": (width, height),
            "prompts": [sample["prompt"] for sample in samples],
            "text": [sample["text"] for sample in samples],
            "id_embedding": torch.nn.functional.normalize(
                torch.stack([sample["id_embedding"] for sample in samples]), dim=-1
            ),
        }
        if self.reference_faces is not None:
            batch["reference_face"] = torch.stack([sample["reference_face"] for sample in samples])
        if "latent_parameters" in samples[0]:
            batch["latent_parameters"] = torch.stack([sample["latent_parameters"] for sample in samples])
            batch["control_parameters"] = [sample["control_parameters"] for sample in samples]
        else:
            batch["pixels"] = torch.stack([sample["pixels"] for sample in samples])
            batch["control"] = torch.stack([sample["control"] for sample in samples])
        return batch

    def cached(self, ref: SampleRef) -> Entry | None:
        """``ref``'s entry in the precompute cache (:meth:`use_cache`), if one fits."""
        if self.cache is None:
            return None
        return self.cache.entry(ref.shard, self.shard_records(ref.shard)[ref.key], ref.size)

    def use_cache(self, cache: EncodedCache | None) -> None:
        """Take the frozen encoders' outputs from ``cache`` where it holds them."""
        self.cache = cache


def require_captions(shards: list[str], captions_dir: Path) -> None:
    """A :class:`StepError` unless every filter shard in ``shards`` has committed captions."""
    captioned = set(committed_shards(captions_dir))
    missing = [shard for shard in shards if shard not in captioned]
    if missing:
        raise StepError(
            f"{len(missing)} filter shard(s) have no captions in {captions_dir} (first: "
            f"{missing[0]}): run the caption step first"
        )


class TrainingSamples(PlannedSamples):
    """Stage 1 (SPSS): the filter's kept portraits, their captions from the caption step's shards."""

    producer = "filter"

    def __init__(
        self,
        filter_dir: Path,
        captions_dir: Path,
        data: DataConfig,
        embedding_space: str,
        global_batch: int,
        reference_faces: int | None = None,
    ):
        super().__init__(filter_dir, data, embedding_space, global_batch, reference_faces)
        self.captions_dir = Path(captions_dir)
        self.mixture = CaptionMixture(data.mixture)
        require_captions(self.shards, self.captions_dir)

    def read_records(self, path: Path) -> list[dict[str, Any]]:
        return read_parquet_records(path)

    def identity_embedding(self, record: dict[str, Any]) -> list[float]:
        return record["face_embedding"]

    def caption(self, ref: SampleRef, record: dict[str, Any], epoch: int) -> str:
        return self.mixture.pick(ref.key, epoch, self.shard_captions(ref.shard).get(ref.key, {}))[1]

    @functools.lru_cache(maxsize=4)  # noqa: B019
    def shard_captions(self, shard: str) -> dict[str, dict[str, Any]]:
        return {row["key"]: row for row in read_caption_rows(self.captions_dir / f"{shard}.parquet")}

    def summary(self) -> dict[str, Any]:
        summary = super().summary()
        if self.data.reference == "same_identity":
            members = self.identity_members().values()
            # their own face is their reference
            summary["samples_alone_in_their_identity"] = sum(1 for refs in members if len(refs) == 1)
        return summary

    @functools.cache  # noqa: B019
    def identity_members(self) -> dict[str | None, tuple[SampleRef, ...]]:
        """Person (:attr:`SampleRef.identity`) -> its trainable samples (a sample without one is alone)."""
        members: dict[str | None, list[SampleRef]] = defaultdict(list)
        for ref in self.trainable():
            members[ref.identity if ref.identity is not None else ref.key].append(ref)
        return {identity: tuple(refs) for identity, refs in members.items()}

    def reference_of(self, ref: SampleRef, epoch: int) -> SampleRef:
        """The sample whose face gives ``ref``'s identity: itself, or (identity-enhanced) another photo of
        its person (:attr:`SampleRef.identity`), drawn per epoch."""
        if self.data.reference == "target":
            return ref
        others = [other for other in self.identity_members()[ref.identity or ref.key] if other.key != ref.key]
        if not others:
            return ref
        return others[int(stable_uniform(self.data.shuffle_seed, ref.key, epoch, "reference") * len(others))]


class PairSamples(PlannedSamples):
    """Stage 2 (SPMS): the kept pairs of the ``spms`` step. The target is the synthetic image
    (``<key>.png``, its faces and bucket are the row's), the identity embedding the real reference's,
    the caption the row's prompt (``data.reference`` and the caption mixture do not apply)."""

    producer = "spms"

    def read_records(self, path: Path) -> list[dict[str, Any]]:
        return read_pair_records(path)

    def identity_embedding(self, record: dict[str, Any]) -> list[float]:
        return record["reference_embedding"]

    def caption(self, ref: SampleRef, record: dict[str, Any], epoch: int) -> str:
        return record["prompt"] or ""


def step_samples(
    inputs: Mapping[str, Path | str],
    settings: TrainConfig,
    embedding_space: str,
    reference_faces: int | None = None,
) -> PlannedSamples:
    """A training step's samples from the folders it reads (:func:`infu.lineage.upstream_inputs`), for
    a model taking ``embedding_space`` embeddings (and aligned reference face crops of ``reference_faces``
    px when set): the SPMS pairs when it reads ``spms`` (stage 2), else the filter's portraits and their
    captions (stage 1)."""
    data, global_batch = settings.data, settings.global_batch
    if "spms" in inputs:
        if reference_faces is not None:
            raise StepError(
                "SPMS pairs hold their reference's embedding, not its face crop: train InfU on them"
            )
        return PairSamples(Path(inputs["spms"]), data, embedding_space, global_batch)
    return TrainingSamples(
        Path(inputs["filter"]), Path(inputs["caption"]), data, embedding_space, global_batch, reference_faces
    )


def worker_batches(
    samples: PlannedSamples, rank: int, world: int, start: int, prefetch: int = 2
) -> Iterator[dict[str, Any]]:
    """Worker ``rank`` of ``world``'s micro batches from plan position ``start`` (a step), read ahead in a
    background thread: slices ``m x world + rank`` of each global batch (``epoch`` and ``position``
    included in each)."""
    micro = samples.data.micro_batch
    slices = range(rank, samples.global_batch // micro, world)
    ready: queue.Queue[dict[str, Any] | BaseException] = queue.Queue(maxsize=prefetch)
    stop = threading.Event()

    def produce() -> None:
        try:
            for position, (epoch, refs) in enumerate(samples.global_batches(start), start=start):
                for index in slices:
                    batch = samples.batch(refs[index * micro : (index + 1) * micro], epoch)
                    while not stop.is_set():
                        try:
                            ready.put({**batch, "epoch": epoch, "position": position}, timeout=0.5)
                            break
                        except queue.Full:
                            continue
                    if stop.is_set():
                        return
        except BaseException as error:  # noqa: BLE001 - handed to the consumer, which raises it
            ready.put(error)

    thread = threading.Thread(target=produce, name="training-data", daemon=True)
    thread.start()
    try:
        while True:
            item = ready.get()
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
