"""The neural caption engines, one per module, picked by source and ``settings.engine``.

- ``small``: ``git`` (:class:`.small.GitCaptioner`) or ``blip`` (:class:`.small.BlipCaptioner`)
- ``blip2``: ``transformers`` (:class:`.blip2.Blip2TransformersCaptioner`) or ``lavis``
  (:class:`.lavis_blip2.Blip2LavisCaptioner`, in LAVIS's runtime env)
- ``internvl2``: ``transformers`` (:class:`.internvl2.InternVL2TransformersCaptioner`) or ``lmdeploy``
  (:class:`.lmdeploy_internvl2.InternVL2LmdeployCaptioner`, in lmdeploy's runtime env, GPU only)

Engine modules are imported only when picked: the LAVIS and lmdeploy runtime envs carry other
transformers versions, in which the other engines' model classes may not exist.

Runtime envs: Ray's ``pip`` runtime env builds a virtualenv on top of the job's environment on each
node (the job's packages stay visible; the pinned ones shadow them). It needs a package index on the
workers and time on first use; in production, a container image with the engine's packages
(``runtime_env: {image_uri: ...}`` in the captioner's settings) is the alternative.
"""

from __future__ import annotations

import copy
import importlib
from typing import TYPE_CHECKING, Any

from captioning.config import Blip2Captioner, InternVL2Captioner, NeuralCaptioner, SmallCaptioner

if TYPE_CHECKING:  # importing this package must not import torch: the caption step's readers import it
    from captioning.engines.base import Captioner

SOURCES: dict[str, type[NeuralCaptioner]] = {
    "small": SmallCaptioner,
    "blip2": Blip2Captioner,
    "internvl2": InternVL2Captioner,
}
ENGINES: dict[type[NeuralCaptioner], dict[str, str]] = {
    SmallCaptioner: {"git": "small:GitCaptioner", "blip": "small:BlipCaptioner"},
    Blip2Captioner: {
        "transformers": "blip2:Blip2TransformersCaptioner",
        "lavis": "lavis_blip2:Blip2LavisCaptioner",
    },
    InternVL2Captioner: {
        "transformers": "internvl2:InternVL2TransformersCaptioner",
        "lmdeploy": "lmdeploy_internvl2:InternVL2LmdeployCaptioner",
    },
}
"""Settings class -> engine -> ``module:class`` in this package."""
LAVIS_PINS = ["salesforce-lavis==1.0.2", "transformers==4.26.1"]
LMDEPLOY_PIN = "lmdeploy==0.18.0"
OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
RUNTIME_ENVS: dict[str, dict[str, Any]] = {
    "lavis_blip2:Blip2LavisCaptioner": {
        "pip": {"packages": LAVIS_PINS, "pip_check": False},
        "env_vars": OFFLINE,
    },
    "lmdeploy_internvl2:InternVL2LmdeployCaptioner": {
        "pip": {"packages": [LMDEPLOY_PIN], "pip_check": False},
        "env_vars": OFFLINE,
    },
}
"""The engines whose pins clash with the job's env (``module:class`` -> its Ray runtime env): a
virtualenv on top of the job's env with LAVIS and its transformers, or lmdeploy and its own torch
(pip_check off: the job's own packages want newer ones). In production a container image with them
(``image_uri``) starts faster and needs no package index on the workers. Declared here, not in the engine
modules, so that the driver picks a runtime env without importing torch or transformers."""


def engine_target(settings: NeuralCaptioner) -> str:
    """``module:class`` of the captioner of ``settings`` (its type and ``engine``), nothing imported."""
    for settings_class, engines in ENGINES.items():
        if isinstance(settings, settings_class):
            engine = getattr(settings, "engine", None)
            if engine not in engines:
                raise ValueError(
                    f"{settings_class.__name__} has no engine {engine!r}: one of {', '.join(engines)}"
                )
            return engines[engine]
    raise TypeError(f"{type(settings).__name__} is not the settings of a neural caption source")


def engine_class(settings: NeuralCaptioner) -> type[Captioner]:
    """The captioner class of ``settings``; imports that engine's module only."""
    module_name, class_name = engine_target(settings).split(":")
    found: type[Captioner] = getattr(importlib.import_module(f"{__name__}.{module_name}"), class_name)
    return found


def load_captioner(source: str, settings: NeuralCaptioner) -> Captioner:
    """Build the captioner of ``source`` (small, blip2 or internvl2): loads its model once."""
    expected = SOURCES.get(source)
    if expected is None:
        raise ValueError(f"unknown neural caption source {source!r}: one of {', '.join(SOURCES)}")
    if not isinstance(settings, expected):
        raise TypeError(f"source {source} takes {expected.__name__} settings, not {type(settings).__name__}")
    return engine_class(settings)(settings)


def runtime_env_for(settings: NeuralCaptioner) -> dict[str, Any] | None:
    """The Ray runtime env of the captioner's workers: ``settings.runtime_env`` when set, else its
    engine's own (:data:`RUNTIME_ENVS`; None for the engines that run in the job's env)."""
    if settings.runtime_env is not None:
        return settings.runtime_env
    return copy.deepcopy(RUNTIME_ENVS.get(engine_target(settings)))
