"""``python -m training precompute`` (step ``precompute``, optional): stage 1's frozen-encoder outputs,
cached once (:mod:`training.cache`) instead of at every epoch of training.

One map phase, a cache shard per filter shard, over the samples stage 1 can train on: ``decode`` (CPU)
crops each target to its bucket (``max_side`` as stage 1's) and draws its keypoint control, exactly as
the training loader does; ``encode`` (the step's GPUs) runs the frozen VAE on both and the text encoders
on every caption the sample has (each source's text; the empty caption is the same for all samples and
is encoded once by training). A sample whose image does not decode is a rejected row with the reason.

Stage 1 reads the cache when the run's config has a ``precompute:`` section (it runs first), entry by
entry: what does not match (image bytes, size, encoders) is encoded live, so the cache never changes
what is trained, only how fast (a test checks equal losses).
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

from infu.captions import CAPTION_SOURCES, read_caption_rows
from infu.config import InfuConfig
from infu.images import BadImageError
from infu.lineage import upstream_inputs
from infu.manifest import open_step_output
from infu.model.config import ModelConfig
from infu.quality.torch_utils import TORCH_DTYPES
from infu.records import Status
from infu.runner import Phase, Stage, StageOutput, run_phase, shard_tasks, stage
from infu.shards import InputImages, committed_shards, read_parquet_records
from infu.steps import StepError
from training.cache import CONTROL, ENCODED, EXTENSION, LATENT, EncodedCache, text_key, text_tensor_names
from training.config import PrecomputeConfig
from training.data import bucket_images, require_captions, scaled_bucket, to_pixels

STEP = "precompute"


def read_samples(ref: dict[str, str]) -> list[dict[str, Any]]:
    """The trainable samples of one filter shard (kept, with a bucket) and their captions."""
    captions = {row["key"]: row for row in read_caption_rows(Path(ref["captions"]))}
    return [
        {"record": record, "tar": ref["tar"], "captions": captions.get(record["key"], {})}
        for record in read_parquet_records(Path(ref["records"]))
        if record["status"] == Status.OK and record["bucket_width"] is not None
    ]


def caption_texts(captions: dict[str, Any]) -> list[str]:
    """A sample's distinct non-empty captions, in source order: every text a caption mixture can pick."""
    texts = [captions.get(source) or "" for source in CAPTION_SOURCES]
    return list(dict.fromkeys(text for text in texts if text.strip()))


class DecodeStage(Stage):
    """CPU: each sample's target at its training size and its keypoint control image, as pixels."""

    name = "decode"
    one_to_one = True

    def __init__(self, max_side: int | None):
        self.max_side = max_side
        self.images = InputImages()

    def process(self, items: list[dict[str, Any]]) -> list[dict[str, Any]]:
        decoded = []
        for item in items:
            record = item["record"]
            size = scaled_bucket(record["bucket_width"], record["bucket_height"], self.max_side)
            row = {
                "key": record["key"],
                "status": Status.OK.value,
                "reject_reason": None,
                "reject_detail": None,
                "sha256": record["sha256"],
                "width": size[0],
                "height": size[1],
                "latent_encoder": None,
                "text_encoder": None,
                "texts": [],
            }
            sample: dict[str, Any] = {"row": row, "texts": caption_texts(item["captions"]), "pixels": None}
            try:
                target, control = bucket_images(self.images.read(item), record, size)
            except BadImageError as error:
                row.update(
                    status=Status.REJECTED.value, reject_reason=error.reason, reject_detail=error.detail
                )
            else:
                sample.update(
                    pixels=to_pixels(target), control=None if control is None else to_pixels(control)
                )
            decoded.append(sample)
        return decoded


class EncodeStage(Stage):
    """GPU: the frozen VAE on targets and controls (by size), the text encoders on the captions; one
    safetensors entry per sample."""

    name = "encode"
    uses_gpu = True
    one_to_one = True

    def __init__(self, model: ModelConfig, settings: PrecomputeConfig):
        self.model = model
        self.settings = settings

    def setup(self) -> None:
        from infu.model.factory import build_encoders
        from training.objective import FrozenEncoders

        device = "cuda" if torch.cuda.is_available() else "cpu"
        pipeline = build_encoders(self.model, device, TORCH_DTYPES[self.settings.param_dtype])
        self.encoders = FrozenEncoders(pipeline, self.model.inference.max_sequence_length)

    def process(self, items: list[dict[str, Any]]) -> list[StageOutput]:
        from safetensors.torch import save

        encoded = [item for item in items if item["pixels"] is not None]
        tensors: list[dict[str, torch.Tensor]] = [{} for _ in encoded]
        if self.settings.latents:
            self.encode_images(encoded, tensors)
        if self.settings.text:
            self.encode_texts(encoded, tensors)
        outputs = {id(item): StageOutput(item["row"]) for item in items}
        for item, entry in zip(encoded, tensors, strict=True):
            entry = {name: tensor.detach().to("cpu").contiguous() for name, tensor in entry.items()}
            outputs[id(item)] = StageOutput(item["row"], save(entry), EXTENSION)
        return [outputs[id(item)] for item in items]

    def encode_images(self, items: list[dict[str, Any]], tensors: list[dict[str, torch.Tensor]]) -> None:
        by_size: dict[tuple[int, ...], list[int]] = defaultdict(list)
        for index, item in enumerate(items):
            by_size[tuple(item["pixels"].shape)].append(index)
        for indices in by_size.values():
            targets = self.encoders.latent_parameters(
                torch.stack([items[index]["pixels"] for index in indices])
            )
            with_control = [index for index in indices if items[index]["control"] is not None]
            controls = (
                self.encoders.latent_parameters(
                    torch.stack([items[index]["control"] for index in with_control])
                )
                if with_control
                else []
            )
            for index, parameters in zip(indices, targets, strict=True):
                tensors[index][LATENT] = parameters.clone()
            for index, parameters in zip(with_control, controls, strict=True):
                tensors[index][CONTROL] = parameters.clone()
        for item in items:
            item["row"]["latent_encoder"] = self.encoders.latent_encoder

    def encode_texts(self, items: list[dict[str, Any]], tensors: list[dict[str, torch.Tensor]]) -> None:
        texts = list(dict.fromkeys(text for item in items for text in item["texts"]))
        embeddings = dict(zip(texts, self.encoders.text(texts), strict=True)) if texts else {}
        for item, entry in zip(items, tensors, strict=True):
            for text in item["texts"]:
                embeds_name, pooled_name = text_tensor_names(text_key(text))
                entry[embeds_name], entry[pooled_name] = (tensor.clone() for tensor in embeddings[text])
            item["row"].update(
                text_encoder=self.encoders.text_encoder, texts=[text_key(text) for text in item["texts"]]
            )


def step_cache(config: InfuConfig, inputs: dict[str, Path], encoders: Any) -> EncodedCache | None:
    """The cache a training step reads for ``encoders`` (:class:`~training.objective.FrozenEncoders`):
    stage 1's (it reads the filter's samples) when the run has a ``precompute:`` section and shards of it
    are committed."""
    if "filter" not in inputs or not config.has_step(STEP) or not committed_shards(config.step_dir(STEP)):
        return None
    return EncodedCache(config.step_dir(STEP), encoders.latent_encoder, encoders.text_encoder)


def run_precompute(config: InfuConfig) -> dict[str, Any]:
    """Encode every trainable sample of the filter's shards; returns the step's manifest."""
    settings: PrecomputeConfig = config.step(STEP)
    inputs = upstream_inputs(config, STEP)
    filter_dir, caption_dir = inputs["filter"], inputs["caption"]
    shards = committed_shards(filter_dir)
    if not shards:
        raise StepError(f"no committed shards in {filter_dir}: run the filter step first")
    require_captions(shards, caption_dir)
    output = open_step_output(config, STEP, settings, filter=str(filter_dir), caption=str(caption_dir))
    phase = Phase(
        label=STEP,
        out_dir=output.out_dir,
        tasks=shard_tasks(shards, records=filter_dir, tar=filter_dir, captions=caption_dir),
        read_task=read_samples,
        stages=[
            stage(DecodeStage, max_side=settings.max_side),
            stage(EncodeStage, model=config.model, settings=settings),
        ],
        resources=settings.resources,
        extra_stats=output.shard_stats,
        table=ENCODED,
    )
    result = run_phase(phase)
    return output.complete(failed_shards=result.failed, run={STEP: result.as_dict()})
