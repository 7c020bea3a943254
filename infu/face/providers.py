"""Where the face models run: onnxruntime providers and torch devices, and saying so when a GPU is missing.

``onnxruntime`` (CPU) and ``onnxruntime-gpu`` install the same ``onnxruntime`` package. With both
installed, whichever was written last wins, and a GPU machine silently detects faces on CPU. A face stack
asked for CUDA (``CUDAExecutionProvider`` in ``face.providers``, for the torch recognizer too) that gets
only CPU logs a warning naming the cause, or fails with :class:`GpuUnavailableError` when
``face.require_gpu`` is set.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from importlib import metadata

logger = logging.getLogger(__name__)

CUDA = "CUDAExecutionProvider"
GPU_PROVIDERS = frozenset({CUDA, "TensorrtExecutionProvider", "ROCMExecutionProvider"})
ONNXRUNTIME_BUILDS = ("onnxruntime", "onnxruntime-gpu")
GPU_INSTALL = "make install MACHINE=gpu"


class GpuUnavailableError(RuntimeError):
    """``face.require_gpu`` is set and the face models would run on CPU."""


def installed_onnxruntime_builds() -> list[str]:
    """Which onnxruntime distributions are installed (``onnxruntime``, ``onnxruntime-gpu`` or both)."""
    builds = []
    for name in ONNXRUNTIME_BUILDS:
        try:
            metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue
        builds.append(name)
    return builds


def onnxruntime_gpu_problem() -> str:
    """Why onnxruntime offers no GPU here, and the fix."""
    builds = installed_onnxruntime_builds()
    if len(builds) == 2:
        return (
            "both onnxruntime and onnxruntime-gpu are installed and the CPU build shadows the GPU one; "
            f"`{GPU_INSTALL}` leaves onnxruntime-gpu only"
        )
    if builds == ["onnxruntime"]:
        return f"only the CPU build of onnxruntime is installed; `{GPU_INSTALL}` installs onnxruntime-gpu"
    return "onnxruntime-gpu is installed but found no usable GPU (driver, CUDA or cuDNN libraries)"


def torch_gpu_problem() -> str:
    """Why torch has no CUDA device here."""
    import torch

    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a CPU build (on a GPU machine `{GPU_INSTALL}` installs CUDA's)"
    return f"torch {torch.__version__} (CUDA {torch.version.cuda}) finds no usable GPU"


def gpu_missing(what: str, reason: str, require_gpu: bool) -> None:
    """Warn loudly that ``what`` runs on CPU although a GPU was asked for; raise when one is required."""
    message = f"{what} runs on CPU although CUDA was asked for: {reason}"
    if require_gpu:
        raise GpuUnavailableError(f"{message} (face.require_gpu is set)")
    logger.warning(message)


def select_providers(requested: Sequence[str], require_gpu: bool = False) -> list[str]:
    """The requested onnxruntime providers that this onnxruntime offers, in the requested order.

    A requested GPU provider that is not offered is reported by :func:`gpu_missing`.
    """
    import onnxruntime

    available = onnxruntime.get_available_providers()
    selected = [name for name in requested if name in available]
    if not selected:
        raise RuntimeError(f"none of the face providers {list(requested)} is in onnxruntime's {available}")
    if any(name in GPU_PROVIDERS for name in requested) and not GPU_PROVIDERS.intersection(selected):
        gpu_missing(f"onnxruntime (providers {available})", onnxruntime_gpu_problem(), require_gpu)
    return selected


def check_session_providers(
    what: str, used: Sequence[str], requested: Sequence[str], require_gpu: bool
) -> None:
    """After a session is built: a GPU provider was requested and offered, but the session fell back to CPU
    (onnxruntime-gpu without a usable GPU)."""
    wanted_gpu = GPU_PROVIDERS.intersection(requested)
    if wanted_gpu and not wanted_gpu.intersection(used):
        gpu_missing(f"{what} (session providers {list(used)})", onnxruntime_gpu_problem(), require_gpu)


def check_install(machine: str) -> str:
    """Whether this environment holds the onnxruntime build of ``machine`` (``cpu`` or ``gpu``) only.

    Returns a one-line summary; raises ``SystemExit`` naming the fix otherwise (``make install`` runs it).
    """
    import onnxruntime

    expected = {"cpu": ["onnxruntime"], "gpu": ["onnxruntime-gpu"]}[machine]
    builds = installed_onnxruntime_builds()
    available = onnxruntime.get_available_providers()
    if builds != expected:
        raise SystemExit(
            f"{machine} install: expected {expected} only, found {builds}; rerun "
            f"`make install MACHINE={machine}`"
        )
    if machine == "gpu" and CUDA not in available:
        raise SystemExit(f"gpu install: onnxruntime-gpu offers no {CUDA} (only {available})")
    return f"{machine} install: {builds[0]} {onnxruntime.__version__}, providers {available}"
