"""The training loop, run by every Ray Train worker, and the steps that launch it: ``stage1`` (pretraining
on the filter's portraits, fresh from the base) and ``stage2`` (SFT on SPMS pairs, from the stage-1
export unless ``init`` says otherwise).

Each worker builds its model family's models (:mod:`training.family`; InfU: frozen FLUX parts, InfuseNet,
projection; Infinite-ID: frozen SDXL, the adapter), sharded, resumes from Ray Train's latest checkpoint
when there is one, then per optimiser step accumulates ``global_batch / (micro_batch x workers)`` micro
batches of the family's loss (flow matching, :mod:`training.objective`; noise prediction,
:mod:`training.infinite_id`), clips, steps AdamW and the LR schedule. Every draw (noise, timesteps,
VAE sampling) comes from a generator seeded by (seed, step, slice of the step's samples), and the data
plan restarts at its saved position, so a resumed run repeats the uninterrupted run's losses exactly (on
CPU), and the worker count does not change what is trained.
Rank 0 logs to the console and TensorBoard and appends one JSON line per step to ``metrics.jsonl``.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from infu.config import InfuConfig
from infu.draws import draw_seed
from infu.lineage import upstream_inputs
from infu.manifest import open_step_output, trained_export
from infu.progress import write_progress
from training.checkpoint import EXPORT_DIR, load_training_state, save_training_state
from training.config import TrainConfig, ValidationConfig
from training.data import step_samples, worker_batches
from training.family import FamilyModels, TrainingFamily, training_family

CHECKPOINTS_DIR = "checkpoints"
VALIDATION_DIR = "validation"
METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
PRINT_PATCH = "RAY_TRAIN_ENABLE_PRINT_PATCH"


@dataclass(frozen=True)
class Trainer:
    """What one worker trains with: its model family, the family's models (pipeline, the module that
    trains, the objective), AdamW over the trainable parameters and its schedule."""

    family: TrainingFamily
    models: FamilyModels
    params: list[torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    scheduler: Any


def build_trainer(
    config: InfuConfig, settings: TrainConfig, device: torch.device, init: Path | None = None
) -> Trainer:
    """Build the family's models from ``init`` (an export of the family; default ``settings.init``) or
    fresh, sharded (FSDP2 when a process group is up and ``settings.fsdp``), and AdamW with linear warmup
    to a constant learning rate."""
    from diffusers.optimization import get_scheduler

    family = training_family(config)
    models = family.build(config, settings, device, init if init is not None else settings.init)
    params = [param for param in models.model.parameters() if param.requires_grad]
    optim = settings.optimizer
    optimizer = torch.optim.AdamW(
        params, lr=optim.lr, betas=optim.betas, weight_decay=optim.weight_decay, eps=optim.eps
    )
    scheduler = get_scheduler("constant_with_warmup", optimizer, num_warmup_steps=optim.warmup_steps)
    return Trainer(family, models, params, optimizer, scheduler)


def validate(
    trainer: Trainer,
    config: InfuConfig,
    identities: list[Any],
    settings: ValidationConfig,
    folder: Path,
    writer: Any,
    step: int,
) -> None:
    """Images of each validation identity for each fixed prompt, with fixed noise: every worker generates
    (the sharded models need all of them), rank 0 (the one with a ``writer``) saves PNGs and TensorBoard
    images."""
    device = trainer.params[0].device
    for number_identity, identity in enumerate(identities):
        for number, prompt in enumerate(settings.prompts):
            generator = torch.Generator(device).manual_seed(settings.seed)
            image = trainer.family.generate(
                trainer.models, config, identity, prompt, settings.num_steps, generator
            )
            if writer is not None:
                name = f"identity{number_identity}_prompt{number}"
                folder.mkdir(parents=True, exist_ok=True)
                image.save(folder / f"{name}.png")
                pixels = torch.from_numpy(np.asarray(image)).permute(2, 0, 1)
                writer.add_image(f"validation/{name}", pixels, step)


def trim_metrics(path: Path, last_step: int) -> None:
    """Drop the lines a killed run wrote after its last checkpoint (they are trained again)."""
    if path.exists():
        lines = [line for line in path.read_text().splitlines() if json.loads(line)["step"] <= last_step]
        path.write_text("".join(line + "\n" for line in lines))


@dataclass(frozen=True)
class StepResult:
    loss: float
    """Mean over the global batch."""
    grad_norm: float
    """Before clipping."""
    tokens: int
    """Image tokens (latent positions the model sees) this worker trained on."""
    cached_share: float
    """Share of this worker's samples whose latents came from the precompute cache."""
    epoch: int


def optimizer_step(
    trainer: Trainer,
    batches: Iterator[dict[str, Any]],
    settings: TrainConfig,
    step: int,
    rank: int,
    accumulation: int,
) -> StepResult:
    """One optimiser step: ``accumulation`` micro batches of the loss, their gradients clipped, AdamW and
    the schedule stepped. Every draw comes from a generator seeded by (seed, step, slice): the slice
    ``micro x workers + rank`` is the same samples for any worker count (one bucket), so 1 worker
    accumulating 2 micro batches trains as 2 workers do."""
    device = trainer.params[0].device
    world = dist.get_world_size() if dist.is_initialized() else 1
    trainer.optimizer.zero_grad(set_to_none=True)
    loss_sum = torch.zeros((), device=device)
    tokens = cached = 0
    for micro in range(accumulation):
        batch = next(batches)
        sample_slice = micro * world + rank
        generator = torch.Generator(device).manual_seed(draw_seed(settings.seed, step, sample_slice))
        loss = trainer.models.objective.loss(batch, generator) / accumulation
        loss.backward()
        loss_sum += loss.detach()
        width, height = batch["size"]
        side = trainer.models.objective.pixels_per_token
        tokens += len(batch["keys"]) * (height // side) * (width // side)
        cached += len(batch["keys"]) if "latent_parameters" in batch else 0
    clip = settings.optimizer.grad_clip
    if clip is not None:
        grad_norm = torch.nn.utils.clip_grad_norm_(trainer.params, clip)
    else:
        grads = [param.grad for param in trainer.params if param.grad is not None]
        grad_norm = torch.nn.utils.get_total_norm(grads)
    trainer.optimizer.step()
    trainer.scheduler.step()
    if dist.is_initialized():
        dist.all_reduce(loss_sum, op=dist.ReduceOp.AVG)
    norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
    samples = accumulation * len(batch["keys"])
    return StepResult(float(loss_sum), float(norm), tokens, cached / samples, batch["epoch"])


def train_loop(payload: dict[str, Any]) -> None:
    """One Ray Train worker: the whole training run."""
    import ray.train
    import ray.train.torch
    from torch.utils.tensorboard import SummaryWriter

    # diffusers' FLUX blocks return views and add residuals out of place, which FSDP2 warns about in case
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
    config: InfuConfig = payload["config"]
    step_name: str = payload["step"]
    out_dir = Path(payload["out_dir"])
    settings: TrainConfig = config.step(step_name)
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    torch.manual_seed(settings.seed)

    trainer = build_trainer(config, settings, device, Path(payload["init"]) if payload["init"] else None)
    model = trainer.models.model
    progress = {"step": 0, "position": 0}
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            progress = load_training_state(Path(folder), model, trainer.optimizer, trainer.scheduler, rank)
        print(f"{step_name}: resumed at step {progress['step']} (data position {progress['position']})")

    family = trainer.family
    samples = step_samples(
        payload["inputs"], settings, family.embedding_space(config), family.reference_faces(trainer.models)
    )
    samples.use_cache(family.encoded_cache(config, payload["inputs"], trainer.models))
    accumulation = settings.accumulation_steps(world)
    batches = worker_batches(samples, rank, world, start=progress["position"])
    validation = settings.validation
    identities = family.validation_identities(samples, validation.identities) if validation.every else []
    writer = None
    if rank == 0:
        trim_metrics(out_dir / METRICS_FILE, progress["step"])
        writer = SummaryWriter(str(out_dir / TENSORBOARD_DIR), purge_step=progress["step"] + 1)
    step, position = progress["step"], progress["position"]
    started, window_samples, window_tokens = time.perf_counter(), 0, 0
    while step < settings.steps:
        done = optimizer_step(trainer, batches, settings, step, rank, accumulation)
        step += 1
        position += 1
        window_samples += settings.global_batch
        window_tokens += done.tokens * world
        seconds = time.perf_counter() - started
        metrics = {
            "step": step,
            "loss": done.loss,
            "lr": trainer.scheduler.get_last_lr()[0],
            "grad_norm": done.grad_norm,
            "samples_per_s": window_samples / seconds,
            "tokens_per_s": window_tokens / seconds,
            "max_memory_mib": (torch.cuda.max_memory_allocated() if device.type == "cuda" else 0) / 2**20,
            "cached_share": done.cached_share,
            "epoch": done.epoch,
        }
        if writer is not None:
            with open(out_dir / METRICS_FILE, "a") as handle:
                handle.write(json.dumps(metrics) + "\n")
            write_progress(out_dir, step_name, step, settings.steps, "steps")
            for name, value in metrics.items():
                if name != "step":
                    writer.add_scalar(f"train/{name}", value, step)
            if step % settings.log_every == 0 or step == settings.steps:
                print(
                    f"{step_name}: step {step}/{settings.steps} loss {metrics['loss']:.4f} "
                    f"lr {metrics['lr']:.2e} grad_norm {metrics['grad_norm']:.3f} "
                    f"{metrics['samples_per_s']:.2f} samples/s",
                    flush=True,
                )
        if validation.every and step % validation.every == 0:
            folder = out_dir / VALIDATION_DIR / f"step_{step:09d}"
            validate(trainer, config, identities, validation, folder, writer, step)
        if step % settings.checkpoint.every == 0 or step == settings.steps:
            with tempfile.TemporaryDirectory() as folder:
                saved = {"step": step, "position": position}
                save_training_state(Path(folder), model, trainer.optimizer, trainer.scheduler, saved, rank)
                ray.train.report(
                    {"step": step, "loss": metrics["loss"]},
                    checkpoint=ray.train.Checkpoint.from_directory(folder),
                    checkpoint_dir_name=f"step_{step:09d}",
                )
            started, window_samples, window_tokens = time.perf_counter(), 0, 0
    if writer is not None:
        writer.close()
    family.export(trainer.models, out_dir / EXPORT_DIR, config, rank, f"step {settings.steps}")


def last_checkpoint_step(folder: Path) -> int | None:
    """The step of the newest complete checkpoint in ``folder`` (Ray Train resumes from it), or None."""
    steps = [int(path.name.split("_")[1]) for path in folder.glob("step_*") if (path / ".metadata").is_file()]
    return max(steps, default=None)


def run_stage1(config: InfuConfig) -> dict[str, Any]:
    return run_training(config, "stage1")


def run_stage2(config: InfuConfig) -> dict[str, Any]:
    return run_training(config, "stage2")


def initial_checkpoint(settings: TrainConfig, inputs: dict[str, Path]) -> Path | None:
    """What training starts from: ``init`` when set, else the export of the stage-1 run the step reads
    (stage 2), else nothing (fresh from the base)."""
    if settings.init is not None:
        return settings.init
    return trained_export(inputs["stage1"]) if "stage1" in inputs else None


def run_training(config: InfuConfig, step_name: str) -> dict[str, Any]:
    """Launch the training run of ``step_name`` on Ray Train and return the step's manifest."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from infu.raycluster import ensure_ray

    settings: TrainConfig = config.step(step_name)
    inputs = upstream_inputs(config, step_name)
    # before anything is written: settings of another model family, a missing stage-1 export or a
    # dataset that cannot batch fail here
    family = training_family(config)
    family.check(config, step_name)
    init = initial_checkpoint(settings, inputs)
    data_summary = step_samples(inputs, settings, family.embedding_space(config)).summary()
    folders = {name: str(path) for name, path in inputs.items()}
    output = open_step_output(config, step_name, settings, **folders)
    resources = settings.resources
    resumed_from = last_checkpoint_step(output.out_dir / CHECKPOINTS_DIR)
    ensure_ray()
    os.environ.setdefault(PRINT_PATCH, "0")  # the patch printed each log line twice
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={
            "config": config,
            "step": step_name,
            "out_dir": str(output.out_dir),
            "inputs": folders,
            "init": str(init) if init else None,
        },
        scaling_config=ScalingConfig(
            num_workers=resources.workers,
            use_gpu=resources.use_gpu,
            resources_per_worker={
                "CPU": resources.cpus_per_worker,
                **({"GPU": 1} if resources.use_gpu else {}),
            },
        ),
        run_config=RunConfig(
            name=CHECKPOINTS_DIR,
            storage_path=str(output.out_dir),
            failure_config=FailureConfig(max_failures=resources.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=settings.checkpoint.keep),
        ),
    )
    result = trainer.fit()
    metrics = [json.loads(line) for line in (output.out_dir / METRICS_FILE).read_text().splitlines()]
    return output.complete(
        inputs=folders,
        data=data_summary,
        init=str(init) if init else None,
        export=str(output.out_dir / EXPORT_DIR),
        checkpoint=result.checkpoint.path if result.checkpoint else None,
        steps=settings.steps,
        resumed_from_step=resumed_from,
        final_loss=metrics[-1]["loss"] if metrics else None,
        counts={"steps": settings.steps, "samples_seen": settings.steps * settings.global_batch},
    )
