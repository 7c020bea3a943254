"""SPMS synthesis: each kept portrait of the filter (the reference) -> new images of that person.

One map phase, a synth shard per filter shard:

1. ``reference`` (CPU): the reference's original bytes, decoded, and its face from the filter's record.
2. ``generate`` (GPU, fan-out): ``samples_per_reference`` samples per reference. Each draws, from the
   reference's key and its index only, a prompt (:mod:`datagen.prompts`, conditioned on the dataset's
   gender attribute), a seed, a LoRA set, maybe a pose photo (its keypoints drawn as the control image)
   and, with ``photo_share``, a pose photo as the target instead of a generation. Generations run the
   InfU pipeline of the stage-1 export with the reference's identity embedding.
3. ``swap`` (GPU: face analysis and the neural swappers): the reference's face swapped onto the
   target's largest face and pasted back (:mod:`datagen.swap`); the identity similarity to the
   reference before and after the swap is recorded. A target without a face is a ``no_face`` row.

Every sample is a pair row (:mod:`infu.pairs`): ``<key>.png`` carries provenance (generator, model
version, seed, prompt) in its PNG text chunks, ``<key>.ref.<ext>`` the reference's original bytes.
"""

from __future__ import annotations

import hashlib
import io
import logging
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps, PngImagePlugin

from datagen.config import LoraSet, SynthConfig, pose_photo_files
from datagen.prompts import PromptBank, PromptSampler, axis_distribution, gender_of
from datagen.swap import build_swapper
from datagen.swap.config import SwapConfig
from infu.config import InfuConfig
from infu.draws import draw_seed, stable_uniform, weighted_index
from infu.face import Face, FaceConfig, cosine_similarity, face_rows, largest_face, load_face_analyzer
from infu.images import BadImageError, decode_image
from infu.lineage import upstream_inputs
from infu.manifest import open_step_output, read_manifest, trained_export
from infu.model.config import ModelConfig
from infu.pairs import PAIR_FIELDS, PAIRS, read_pair_records, reference_member
from infu.records import RejectReason, new_record, reject
from infu.runner import Phase, Stage, StageOutput, run_phase, shard_tasks, stage
from infu.shards import InputImages, committed_shards, parquet_paths, read_parquet_records
from infu.steps import StepError

STEP = "synth"
GENERATOR_NAME = "infu-spms-synth"
"""The ``generator`` PNG text chunk of every synthetic image."""

log = logging.getLogger(__name__)


def read_references(ref: dict[str, str]) -> list[dict[str, Any]]:
    """The kept samples of one filter shard that have a face embedding, and the tar holding their bytes."""
    return [
        {"record": record, "tar": ref["tar"]}
        for record in read_parquet_records(Path(ref["records"]))
        if record["status"] == "ok" and record["face_embedding"] is not None and record["faces"]
    ]


def record_face(record: dict[str, Any]) -> Face:
    """A sample's largest face as the filter recorded it (records keep faces largest first)."""
    face = record["faces"][0]
    return Face(
        bbox=np.asarray(face["bbox"], dtype=np.float32),
        score=float(face["score"]),
        kps=np.asarray(face["keypoints"], dtype=np.float32).reshape(5, 2),
        embedding=np.asarray(record["face_embedding"], dtype=np.float32),
        pose=None,
    )


def png_with_provenance(image: np.ndarray, provenance: dict[str, str]) -> bytes:
    """``image`` as PNG bytes with ``provenance`` in its text chunks."""
    info = PngImagePlugin.PngInfo()
    for name, value in provenance.items():
        info.add_itxt(name, value)
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


def read_provenance(png: bytes) -> dict[str, str]:
    """The text chunks of a PNG written by :func:`png_with_provenance`."""
    with Image.open(io.BytesIO(png)) as image:
        return dict(image.text)  # type: ignore[attr-defined]


class ReferenceStage(Stage):
    """CPU: each reference's original bytes and decoded RGB (an undecodable one fails all its samples)."""

    name = "reference"
    one_to_one = True

    def __init__(self, max_pixels: int):
        self.max_pixels = max_pixels
        self.images = InputImages()

    def process(self, items: list[dict[str, Any]]) -> list[dict[str, Any]]:
        references = []
        for item in items:
            data = self.images.read(item)
            try:
                rgb: np.ndarray | None = np.asarray(decode_image(data, self.max_pixels))
                error = None
            except BadImageError as bad:
                rgb, error = None, f"{bad.reason}: {bad.detail}"
            references.append({"record": item["record"], "bytes": data, "rgb": rgb, "error": error})
        return references


class GenerateStage(Stage):
    """GPU: ``samples_per_reference`` targets per reference, generated by the stage-1 model (or, with
    ``photo_share``, pose photos)."""

    name = "generate"
    uses_gpu = True

    def __init__(self, settings: SynthConfig, model: ModelConfig, face: FaceConfig, device: str):
        self.settings = settings
        self.model = model
        self.face = face
        self.device = device

    def setup(self) -> None:
        import torch

        from infu.model.factory import build_pipeline

        self.torch = torch
        # Prompts are recorded whole in the pair rows; the text encoders' token budgets cut long ones.
        logging.getLogger("diffusers.pipelines.flux.pipeline_flux").addFilter(
            lambda record: "was truncated" not in record.getMessage()
        )
        self.pipeline = build_pipeline(self.model, load_face_analyzer(self.face), self.device)
        self.pipeline.set_progress_bar_config(disable=True)
        inference = self.pipeline.inference
        self.size = (self.settings.width or inference.width, self.settings.height or inference.height)
        self.sampler = PromptSampler(PromptBank.load(self.settings.prompt_bank), self.settings.seed)
        self.adapters = self._load_lora_sets()
        self.poses = self._pose_photos()

    def _load_lora_sets(self) -> dict[str, tuple[list[str], list[float]]]:
        """Every LoRA of every set loaded once as its own adapter: set name -> (adapters, scales)."""
        self._tiny_loras = tempfile.TemporaryDirectory(prefix="tiny-loras-")
        adapters: dict[str, tuple[list[str], list[float]]] = {}
        for lora_set in self.settings.lora_sets:
            names = []
            for index, lora in enumerate(lora_set.loras):
                path = lora.path
                if path is None:
                    from infu.model.tiny import write_tiny_lora

                    width = self.model.projection.output_dim
                    path = write_tiny_lora(Path(self._tiny_loras.name), width, seed=int(lora.tiny_seed or 0))
                name = f"{lora_set.name}_{index}"
                self.pipeline.load_lora_weights(str(path), adapter_name=name)
                names.append(name)
            adapters[lora_set.name] = (names, [lora.scale for lora in lora_set.loras])
        return adapters

    def _pose_photos(self) -> list[dict[str, Any]]:
        """Pose photos with a face: name, the target-sized photo and its keypoint control drawing."""
        from infu.face import NoFaceError

        poses = []
        for path in pose_photo_files(self.settings.pose_photos):
            try:
                photo = decode_image(path.read_bytes(), self.settings.max_pixels)
                drawing = self.pipeline.control_for(*self.size, control_image=photo)
            except (BadImageError, NoFaceError) as error:
                log.warning("pose photo %s skipped: %s", path, error)
                continue
            poses.append(
                {"name": path.name, "target": np.asarray(ImageOps.fit(photo, self.size)), "drawing": drawing}
            )
        if (
            (self.settings.pose_share > 0 or self.settings.photo_share > 0)
            and self.settings.pose_photos
            and not poses
        ):
            raise StepError(f"no photo in {self.settings.pose_photos} has a face: none can give a pose")
        return poses

    def _draw(self, key: str, index: int, what: str, choices: int) -> int:
        return min(int(stable_uniform(self.settings.seed, key, index, what) * choices), choices - 1)

    def _lora_set(self, key: str, index: int) -> LoraSet:
        sets = self.settings.lora_sets
        return sets[
            weighted_index([lora_set.weight for lora_set in sets], self.settings.seed, key, index, "lora_set")
        ]

    def _generate(
        self, reference: dict[str, Any], prompt: str, seed: int, lora_set: LoraSet, pose: dict | None
    ):
        names, scales = self.adapters[lora_set.name]
        if names:
            self.pipeline.enable_lora()
            self.pipeline.set_adapters(names, adapter_weights=scales)
        elif any(self.adapters.values()):
            self.pipeline.disable_lora()
        generator = self.torch.Generator(self.device).manual_seed(seed)
        embedding = self.torch.tensor(np.asarray(reference["record"]["face_embedding"], dtype=np.float32))
        image = self.pipeline(
            prompt=prompt,
            id_embedding=embedding[None],
            control_drawing=pose["drawing"] if pose else None,
            width=self.size[0],
            height=self.size[1],
            num_inference_steps=self.settings.num_steps,
            guidance_scale=self.settings.guidance_scale,
            generator=generator,
        ).images[0]
        return np.asarray(image.convert("RGB"))

    def process(self, items: list[dict[str, Any]]) -> list[dict[str, Any]]:
        samples = []
        for reference in items:
            record = reference["record"]
            key = record["key"]
            for index in range(self.settings.samples_per_reference):
                prompt = self.sampler.sample(key, index, gender_of(record["attributes"]))
                seed = draw_seed(self.settings.seed, key, index, "noise")
                as_photo = bool(self.poses) and stable_uniform(self.settings.seed, key, index, "photo") < (
                    self.settings.photo_share
                )
                with_pose = as_photo or (
                    bool(self.poses)
                    and stable_uniform(self.settings.seed, key, index, "pose") < self.settings.pose_share
                )
                pose = (
                    self.poses[self._draw(key, index, "pose_photo", len(self.poses))] if with_pose else None
                )
                lora_set = self._lora_set(key, index)
                sample = {
                    "reference": reference,
                    "index": index,
                    "prompt": prompt,
                    "seed": seed,
                    "generator": "photo" if as_photo else "infu",
                    "lora_set": None if as_photo else lora_set,
                    "pose_photo": pose["name"] if pose else None,
                    "image": None,
                    "error": reference["error"],
                }
                if reference["error"] is None and pose is not None and as_photo:
                    sample["image"] = pose["target"]
                elif reference["error"] is None:
                    sample["image"] = self._generate(reference, prompt.text, seed, lora_set, pose)
                samples.append(sample)
        return samples

    def teardown(self) -> None:
        if hasattr(self, "_tiny_loras"):
            self._tiny_loras.cleanup()


class SwapStage(Stage):
    """GPU (face analysis, neural swappers): the reference's face onto each target's largest face; the pair
    row with both identity similarities."""

    name = "swap"
    uses_gpu = True
    one_to_one = True

    def __init__(self, swap: SwapConfig, face: FaceConfig, model_version: str):
        self.swap_config = swap
        self.face = face
        self.model_version = model_version

    def setup(self) -> None:
        self.analyzer = load_face_analyzer(self.face)
        self.swapper = build_swapper(self.swap_config)

    def process(self, items: list[dict[str, Any]]) -> list[StageOutput]:
        return [self.pair(item) for item in items]

    def pair(self, sample: dict[str, Any]) -> StageOutput:
        reference = sample["reference"]
        ref_record = reference["record"]
        record = self.pair_record(sample)
        if sample["error"] is not None:
            return StageOutput(reject(record, RejectReason.BAD_IMAGE, f"reference: {sample['error']}"))
        target_face = largest_face(self.analyzer.analyze_rgb(sample["image"]))
        if target_face is None:
            return StageOutput(
                reject(record, RejectReason.NO_FACE, f"no face in the {sample['generator']} target")
            )
        ref_face = record_face(ref_record)
        swapped = self.swapper.swap(sample["image"], target_face, reference["rgb"], ref_face)
        faces = sorted(self.analyzer.analyze_rgb(swapped), key=lambda face: face.area, reverse=True)
        scores = {"similarity_before_swap": cosine_similarity(ref_face.embedding, target_face.embedding)}
        if faces:
            scores["similarity_after_swap"] = cosine_similarity(ref_face.embedding, faces[0].embedding)
        png = png_with_provenance(swapped, self.provenance(record, sample))
        record.update(
            sha256=hashlib.sha256(png).hexdigest(),
            size_bytes=len(png),
            faces=face_rows(faces),
            face_embedding=faces[0].embedding.tolist() if faces else None,
            face_embedding_space=self.analyzer.embedding_space if faces else None,
            scores=scores,
        )
        if not faces:
            reject(record, RejectReason.NO_FACE, "no face after the swap")
            return StageOutput(record)
        return StageOutput(record, png, "png", {reference_member(record): reference["bytes"]})

    def pair_record(self, sample: dict[str, Any]) -> dict[str, Any]:
        """The pair row of a sample, before its synthetic image is scored."""
        ref = sample["reference"]["record"]
        index = sample["index"]
        height, width = sample["image"].shape[:2] if sample["image"] is not None else (None, None)
        record = new_record(
            ref["dataset"],
            f"{STEP}/{ref['key']}/{index:02d}",
            identity=ref["identity"],
            attributes=ref["attributes"],
            identity_cluster=ref["identity_cluster"],
            width=width,
            height=height,
            bucket_width=width,
            bucket_height=height,
            mime="image/png",
        )
        lora_set: LoraSet | None = sample["lora_set"]
        record.update(dict.fromkeys(field.name for field in PAIR_FIELDS))
        record.update(
            key=f"{ref['key']}-{index:02d}",
            reference_key=ref["key"],
            reference_mime=ref["mime"],
            reference_embedding=ref["face_embedding"],
            reference_keypoints=ref["faces"][0]["keypoints"],
            prompt=sample["prompt"].text,
            prompt_axes=sample["prompt"].axes,
            seed=sample["seed"],
            generator=sample["generator"],
            model_version=self.model_version if sample["generator"] == "infu" else None,
            lora_set=lora_set.name if lora_set else None,
            loras={f"{lora.path or f'tiny:{lora.tiny_seed}'}": lora.scale for lora in lora_set.loras}
            if lora_set
            else {},
            pose_photo=sample["pose_photo"],
            swap_backend=self.swap_config.backend,
        )
        return record

    def provenance(self, record: dict[str, Any], sample: dict[str, Any]) -> dict[str, str]:
        return {
            "generator": GENERATOR_NAME,
            "source": sample["generator"],
            "model_version": record["model_version"] or "",
            "seed": str(record["seed"]),
            "prompt": record["prompt"],
            "lora_set": record["lora_set"] or "",
            "swap_backend": record["swap_backend"],
            "reference_key": record["reference_key"],
        }


def check_embedding_spaces(filter_dir: Path, config: InfuConfig) -> None:
    """References, the projection and the swap's face stack must share one face embedding space."""
    spaces = {
        "the filter's references (its face.recognizer)": (read_manifest(filter_dir) or {}).get(
            "embedding_space"
        ),
        "model.projection.embedding_space": config.model.projection.embedding_space,
        "this run's face.recognizer": config.face.recognizer,  # each recognizer is its own space
    }
    if len(set(spaces.values())) != 1:
        described = ", ".join(f"{name}: {space}" for name, space in spaces.items())
        raise StepError(f"synthesis needs one face embedding space; found {described}")


def synth_phase(
    config: InfuConfig, filter_dir: Path, export: Path, out_dir: Path, extra_stats: dict
) -> Phase:
    settings: SynthConfig = config.step(STEP)
    model = config.model.model_copy(update={"infu_model": export, "loras": [], "fuse_loras": False})
    return Phase(
        label=STEP,
        out_dir=out_dir,
        tasks=shard_tasks(committed_shards(filter_dir), records=filter_dir, tar=filter_dir),
        read_task=read_references,
        stages=[
            stage(ReferenceStage, max_pixels=settings.max_pixels),
            stage(
                GenerateStage,
                settings=settings,
                model=model,
                face=config.face,
                device="cuda" if settings.resources.num_gpus > 0 else "cpu",
            ),
            stage(SwapStage, swap=settings.swap, face=config.face, model_version=config.model.infu_version),
        ],
        resources=settings.resources,
        extra_stats=extra_stats,
        table=PAIRS,
    )


def run_synth(config: InfuConfig) -> dict[str, Any]:
    """Make SPMS pairs from every kept portrait of the filter's output; returns the step's manifest."""
    settings: SynthConfig = config.step(STEP)
    inputs = upstream_inputs(config, STEP)
    filter_dir = inputs["filter"]
    if not committed_shards(filter_dir):
        raise StepError(f"no committed shards in {filter_dir}: run the filter step first")
    export = trained_export(inputs["stage1"])
    if settings.pose_photos is not None and not settings.pose_photos.is_dir():
        raise StepError(f"synth.pose_photos {settings.pose_photos} is not a folder")
    check_embedding_spaces(filter_dir, config)
    bank = PromptBank.load(settings.prompt_bank)
    output = open_step_output(config, STEP, settings, filter=str(filter_dir), stage1=str(export))
    result = run_phase(synth_phase(config, filter_dir, export, output.out_dir, output.shard_stats))
    return output.complete(
        failed_shards=result.failed,
        run={STEP: result.as_dict()},
        export=str(export),
        prompt_bank={"version": bank.version, "fingerprint": bank.fingerprint()},
        prompt_axes=prompt_axes(output.out_dir),
    )


def prompt_axes(out_dir: Path) -> dict[str, dict[str, int]]:
    """How often each value of each prompt axis was drawn, over every pair row written."""
    rows = (row for path in parquet_paths(out_dir) for row in read_pair_records(path))
    return axis_distribution(row["prompt_axes"] or {} for row in rows)
