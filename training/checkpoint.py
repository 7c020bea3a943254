"""Training state in torch distributed checkpoints (sharded: each worker writes its own part), and the
export of a consolidated InfU checkpoint in the released layout.

A checkpoint holds the trainable model (InfU: InfuseNet + projection; Infinite-ID: the adapter; the
frozen base is rebuilt from its config), the AdamW state, the LR schedule, the step and the data plan's
position, and each worker's RNG states. Ray Train merges the workers' folders into one checkpoint and
registers it only once every worker has reported it (so it is committed whole or not at all), and keeps
the newest ``keep``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)

from infu.model.infu import InfU
from infu.model.infusenet import InfuseNet
from infu.model.projection import IdentityProjection
from infu.runner import run_reduce

EXPORT_DIR = "export"


def rng_file(folder: Path, rank: int) -> Path:
    return Path(folder) / f"rng-rank{rank:05d}.pt"


def rng_states() -> dict[str, Any]:
    states: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def save_training_state(
    folder: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    progress: dict[str, int],
    rank: int,
) -> None:
    """Every worker writes its shards of the state into ``folder`` (a collective call)."""
    model_state, optimizer_state = get_state_dict(model, optimizer)
    state = {
        "model": model_state,
        "optimizer": optimizer_state,
        "scheduler": scheduler.state_dict(),
        "progress": dict(progress),
    }
    dcp.save(state, checkpoint_id=str(folder))
    torch.save(rng_states(), rng_file(folder, rank))


def load_training_state(
    folder: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, rank: int
) -> dict[str, int]:
    """Restore what :func:`save_training_state` wrote (a collective call); returns the progress."""
    model_state, optimizer_state = get_state_dict(model, optimizer)
    state = {
        "model": model_state,
        "optimizer": optimizer_state,
        "scheduler": scheduler.state_dict(),
        "progress": {"step": 0, "position": 0},
    }
    dcp.load(state, checkpoint_id=str(folder))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    saved_rng = rng_file(folder, rank)
    if saved_rng.exists():  # absent when the worker count changed: draws are seeded by step anyway
        states = torch.load(saved_rng, weights_only=False)
        torch.set_rng_state(states["torch"])
        if "cuda" in states and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(states["cuda"])
    return {key: int(value) for key, value in state["progress"].items()}


def export_infu(infu: InfU, root: Path, version: str, rank: int, identity: str) -> None:
    """Gather the full weights (a collective call) and, on rank 0, write ``root`` in the released layout
    (``InfU.save_pretrained``) as a reduce output (:func:`infu.runner.run_reduce`): built in a temporary
    folder renamed into place, a killed attempt's leftovers removed, kept when made for ``identity``."""
    full = get_model_state_dict(infu, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank != 0:
        return

    def build(folder: Path) -> dict[str, str]:
        projection = IdentityProjection.from_config(infu.projection.config)
        plain = InfU(projection, InfuseNet.from_config(infu.infusenet.config))
        plain.load_state_dict(full, strict=True)
        plain.save_pretrained(folder, version=version)
        return {"version": version}

    run_reduce(Path(root), identity, build)
