"""InternVL2 through lmdeploy's TurboMind engine (``engine: lmdeploy``), for GPU nodes.

lmdeploy 0.18.0 pins torch<=2.12.1, so it runs in a Ray runtime env of its own
(:data:`captioning.engines.RUNTIME_ENVS`), never in the main environment. ``settings.model`` is an
original OpenGVLab/InternVL2-* folder (with its remote code, hence ``trust_remote_code``); real checkpoints
only, there is no tiny variant.

Default prompt: ``Describe the person in this photo in one detailed sentence.`` (lmdeploy applies the
model's chat template). Decoding is greedy (``do_sample=False``, ``top_k=1``). ``tensor_parallel`` GPUs
serve one model replica, ``session_len`` bounds a request's context, ``batch_size`` images go to one
pipeline call. TurboMind computes in 16 bits: ``dtype: float32`` (the default) means the checkpoint's.
"""

from __future__ import annotations

from PIL import Image

from captioning.config import InternVL2Captioner
from captioning.engines import LMDEPLOY_PIN
from captioning.engines.base import PERSON_PROMPT, Captioner, require_folder

TURBOMIND_DTYPES = {"float32": "auto", "float16": "float16", "bfloat16": "bfloat16"}


class InternVL2LmdeployCaptioner(Captioner):
    """An lmdeploy ``pipeline`` over ``settings.model``; one (prompt, image) request per image."""

    default_prompt = PERSON_PROMPT

    def __init__(self, settings: InternVL2Captioner) -> None:
        super().__init__(settings)
        assert settings.model is not None, "the config requires variant full (a model folder) here"
        if settings.device == "cpu":
            raise ValueError(
                "lmdeploy's TurboMind runs on CUDA GPUs only; engine transformers runs on the CPU"
            )
        try:
            from lmdeploy import (  # type: ignore[import-not-found]
                GenerationConfig,
                TurbomindEngineConfig,
                pipeline,
            )
        except ImportError as error:
            raise ImportError(
                f"engine lmdeploy needs {LMDEPLOY_PIN}, which cannot share the main environment (it pins "
                "torch<=2.12.1): run it in its Ray runtime env (captioning.engines.runtime_env_for) or an "
                "image with it"
            ) from error
        folder = require_folder(settings.model, "InternVL2")
        first_gpu = int(settings.device.partition(":")[2] or 0)
        engine_config = TurbomindEngineConfig(
            tp=settings.tensor_parallel,
            session_len=settings.session_len,
            max_batch_size=settings.batch_size,
            dtype=TURBOMIND_DTYPES[settings.dtype],
            devices=list(range(first_gpu, first_gpu + settings.tensor_parallel)),
        )
        self.pipe = pipeline(str(folder), backend_config=engine_config, trust_remote_code=True)
        self.generation = GenerationConfig(max_new_tokens=settings.max_new_tokens, do_sample=False, top_k=1)

    def generate(self, images: list[Image.Image]) -> list[str]:
        responses = self.pipe([(self.prompt, image) for image in images], gen_config=self.generation)
        return [response.text for response in responses]
