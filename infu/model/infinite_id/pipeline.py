"""Infinite-ID on SDXL: identity photo(s) -> aligned face -> OpenCLIP hidden states + ArcFace embedding ->
identity tokens -> two denoising streams in one batch, the identity stream with mixed attention.

Prompt encoding, SDXL's added time conditions, latents and decoding come from diffusers'
``StableDiffusionXLPipeline``; the attention is :mod:`infu.model.infinite_id.attention`'s, installed on the
UNet by the adapter. Sampling is DDIM (30 steps, guidance 5.0 by default, as in the paper).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import open_clip
import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
from diffusers.image_processor import VaeImageProcessor
from diffusers.pipelines.pipeline_utils import DiffusionPipeline
from diffusers.pipelines.stable_diffusion_xl.pipeline_output import StableDiffusionXLPipelineOutput
from open_clip.transformer import VisionTransformer
from torch import nn
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from infu.face import Face, FaceAnalyzer
from infu.face.recognizer import EMBEDDING_DIMS
from infu.images import ImageInput
from infu.model.conditioning import aligned_face_pixels, describe, required_face
from infu.model.infinite_id.adapter import InfiniteIdAdapter
from infu.model.infinite_id.mappers import mix_identities
from infu.model.infinite_id.tiny import (
    sdxl_ddim_scheduler,
    tiny_adapter,
    tiny_open_clip_vision,
    tiny_sdxl_components,
)

SDXL_COMPONENTS = ("vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "unet")
"""What the pipeline takes from an SDXL folder (the scheduler is replaced by DDIM)."""
RELEASE_ARCFACE_DIM = EMBEDDING_DIMS["glintr100"]
"""ArcFace embedding size of the released Infinite-ID (insightface's recognizer)."""


class OpenClipVision(nn.Module):
    """OpenCLIP's image tower (``VisionTransformer``) as Infinite-ID reads it: the last hidden states."""

    def __init__(self, visual: VisionTransformer):
        super().__init__()
        self.visual = visual.eval()

    @property
    def device(self) -> torch.device:
        return self.visual.conv1.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.visual.conv1.weight.dtype

    @property
    def image_size(self) -> int:
        return self.visual.image_size[0]

    @property
    def width(self) -> int:
        return self.visual.transformer.width

    def forward(self, faces: torch.Tensor) -> torch.Tensor:
        """``[B, 3, S, S]`` RGB in [0, 1] -> last hidden states ``[B, 1 + patches, width]`` (class token
        first, before the final LayerNorm, like ``CLIPVisionModel``'s ``last_hidden_state``)."""
        mean = torch.tensor(open_clip.OPENAI_DATASET_MEAN, device=faces.device).view(1, 3, 1, 1)
        std = torch.tensor(open_clip.OPENAI_DATASET_STD, device=faces.device).view(1, 3, 1, 1)
        pixels = ((faces - mean) / std).to(device=self.device, dtype=self.dtype)
        output = self.visual.forward_intermediates(
            pixels, indices=1, output_fmt="NLC", output_extra_tokens=True, intermediates_only=True
        )
        return torch.cat([output["image_intermediates_prefix"][-1], output["image_intermediates"][-1]], dim=1)


class InfiniteIdPipeline(StableDiffusionXLPipeline):
    """SDXL + Infinite-ID adapter + OpenCLIP ViT-H/14 image tower.

    ``face_analyzer`` (needed for identity photos only) finds the largest face and embeds it; its embedding
    size must be the adapter's ``arcface_dim``.
    """

    model_cpu_offload_seq = "text_encoder->text_encoder_2->clip_vision->adapter->unet->vae"
    _optional_components: list[str] = []  # SDXL's IP-Adapter parts are not components here
    _callback_tensor_inputs = ["latents"]

    def __init__(
        self,
        vae: AutoencoderKL,
        text_encoder: CLIPTextModel,
        text_encoder_2: CLIPTextModelWithProjection,
        tokenizer: CLIPTokenizer,
        tokenizer_2: CLIPTokenizer,
        unet: UNet2DConditionModel,
        scheduler: DDIMScheduler,
        adapter: InfiniteIdAdapter,
        clip_vision: OpenClipVision,
        face_analyzer: FaceAnalyzer | None = None,
        force_zeros_for_empty_prompt: bool = True,
    ):
        DiffusionPipeline.__init__(self)
        encoder = adapter.encoder.config
        if clip_vision.width != encoder.clip_dim:
            raise ValueError(
                f"the image tower's hidden states are {clip_vision.width} wide but the "
                f"adapter's CLIP mapper expects {encoder.clip_dim}"
            )
        if face_analyzer is not None and face_analyzer.embedding_dim != encoder.arcface_dim:
            raise ValueError(
                f"the {face_analyzer.backend} face backend gives {face_analyzer.embedding_dim}-D embeddings "
                f"but the adapter's face mapper expects {encoder.arcface_dim}-D"
            )
        adapter.attach(unet)
        self.register_modules(
            vae=vae,
            text_encoder=text_encoder,
            text_encoder_2=text_encoder_2,
            tokenizer=tokenizer,
            tokenizer_2=tokenizer_2,
            unet=unet,
            scheduler=scheduler,
            adapter=adapter,
            clip_vision=clip_vision,
        )
        self.register_to_config(force_zeros_for_empty_prompt=force_zeros_for_empty_prompt)
        self.face_analyzer = face_analyzer
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor)
        self.default_sample_size = unet.config.sample_size
        self.watermark = None

    # construction -------------------------------------------------------------------------------------

    @classmethod
    def tiny(
        cls,
        seed: int = 0,
        face_analyzer: FaceAnalyzer | None = None,
        adapter: InfiniteIdAdapter | None = None,
        arcface_dim: int | None = None,
    ) -> InfiniteIdPipeline:
        """Tiny random SDXL and image tower (:mod:`infu.model.infinite_id.tiny`), seeded, with ``adapter``
        (a trained tiny one) or a fresh tiny adapter whose face mapper takes ``arcface_dim`` (default: the
        analyzer's embedding size, else 512)."""
        components = tiny_sdxl_components(seed)
        clip_vision = OpenClipVision(tiny_open_clip_vision(seed))
        if adapter is None:
            if arcface_dim is None:
                arcface_dim = (
                    face_analyzer.embedding_dim if face_analyzer is not None else RELEASE_ARCFACE_DIM
                )
            adapter = tiny_adapter(components["unet"], clip_vision.width, arcface_dim, seed)
        return cls(**components, adapter=adapter, clip_vision=clip_vision, face_analyzer=face_analyzer)

    @classmethod
    def from_local(
        cls,
        sdxl_dir: str | Path,
        adapter_dir: str | Path | None,
        open_clip_dir: str | Path,
        face_analyzer: FaceAnalyzer | None = None,
        dtype: torch.dtype = torch.float32,
        arcface_dim: int = RELEASE_ARCFACE_DIM,
    ) -> InfiniteIdPipeline:
        """Assemble from local folders only: an SDXL diffusers folder, an adapter folder
        (:meth:`InfiniteIdAdapter.save_pretrained`; None: a fresh adapter at the paper's sizes, whose face
        mapper takes ``arcface_dim``, to train) and an OpenCLIP model folder (``open_clip_config.json`` +
        weights, as laion's ViT-H/14 release); DDIM replaces SDXL's scheduler."""
        base = StableDiffusionXLPipeline.from_pretrained(
            sdxl_dir, dtype=dtype, local_files_only=True, add_watermarker=False
        )
        clip_vision = OpenClipVision(open_clip.create_model(f"local-dir:{Path(open_clip_dir)}").visual)
        if adapter_dir is None:
            adapter = InfiniteIdAdapter.for_unet(
                base.unet, clip_dim=clip_vision.width, arcface_dim=arcface_dim
            )
        else:
            adapter = InfiniteIdAdapter.from_pretrained(adapter_dir)
        return cls(
            **{name: getattr(base, name) for name in SDXL_COMPONENTS},
            scheduler=sdxl_ddim_scheduler(),
            adapter=adapter.to(dtype),
            clip_vision=clip_vision.to(dtype),
            face_analyzer=face_analyzer,
        )

    # identity -----------------------------------------------------------------------------------------

    def face_features(self, image: ImageInput) -> tuple[torch.Tensor, torch.Tensor]:
        """The largest face of ``image``: its aligned crop's hidden states ``[1, 1 + patches, width]`` and
        its identity embedding ``[1, D]``; raises :class:`infu.face.NoFaceError` without a face."""
        if self.face_analyzer is None:
            raise ValueError("id_images need a face analyzer; build the pipeline with one")
        rgb = self.face_analyzer.load(image)
        return self.aligned_face_features(rgb, required_face(self.face_analyzer, rgb, describe(image)))

    def aligned_face_features(self, rgb: np.ndarray, face: Face) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`face_features` of a face already found in ``rgb`` (an RGB array)."""
        faces = aligned_face_pixels(rgb, face.kps, self.clip_vision.image_size)[None]
        embedding = torch.as_tensor(np.asarray(face.embedding, dtype=np.float32))[None]
        return self.clip_vision(faces), embedding

    def encode_identity(
        self, clip_hidden_states: torch.Tensor, arcface_embedding: torch.Tensor
    ) -> torch.Tensor:
        """Identity tokens ``[B, tokens, cross_attention_dim]`` from the adapter's identity encoder."""
        return self.adapter(
            clip_hidden_states.to(device=self._execution_device, dtype=self.adapter.dtype),
            arcface_embedding.to(device=self._execution_device, dtype=self.adapter.dtype),
        )

    def unconditional_identity(self) -> torch.Tensor:
        """``[1, tokens, dim]``: the identity tokens of a black face and a zero embedding (classifier-free
        guidance's negative identity, as IP-Adapter's)."""
        size = self.clip_vision.image_size
        black = self.clip_vision(torch.zeros(1, 3, size, size))
        return self.encode_identity(black, torch.zeros(1, self.adapter.encoder.config.arcface_dim))

    def identity_tokens(
        self,
        id_images: ImageInput | Sequence[ImageInput] | None = None,
        id_embeddings: torch.Tensor | Sequence[torch.Tensor] | None = None,
        id_weights: Sequence[float] | None = None,
    ) -> torch.Tensor:
        """``[1, tokens, dim]`` identity tokens of one identity, or the weighted mix of several
        (identity mixing; weights default to equal).

        ``id_images``: one photo or several, one identity each. ``id_embeddings``: precomputed identity
        tokens, ``[tokens, dim]`` for one identity or ``[N, tokens, dim]`` / a list for N identities.
        """
        if (id_images is None) == (id_embeddings is None):
            raise ValueError("pass exactly one of id_images and id_embeddings")
        if id_images is not None:
            images = list(id_images) if isinstance(id_images, (list, tuple)) else [id_images]
            identities = [self.encode_identity(*self.face_features(image)) for image in images]
        else:
            stacked = (
                id_embeddings if isinstance(id_embeddings, torch.Tensor) else torch.stack(list(id_embeddings))
            )
            stacked = stacked.reshape(-1, *stacked.shape[-2:])
            identities = [
                tokens[None].to(device=self._execution_device, dtype=self.adapter.dtype) for tokens in stacked
            ]
        return mix_identities(identities, id_weights)

    # sampling -----------------------------------------------------------------------------------------

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        id_images: ImageInput | Sequence[ImageInput] | None = None,
        id_embeddings: torch.Tensor | Sequence[torch.Tensor] | None = None,
        id_weights: Sequence[float] | None = None,
        mode: str = "mixed",
        adain: str | None = "mean",
        identity_scale: float = 1.0,
        negative_prompt: str | list[str] | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 30,
        guidance_scale: float = 5.0,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        callback_on_step_end: Callable[[DiffusionPipeline, int, torch.Tensor, dict], dict] | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
    ) -> StableDiffusionXLPipelineOutput | tuple:
        """Images of the identity for ``prompt`` (a string or a batch); the identity stream's images.

        ``mode="mixed"`` (the paper's inference) or ``"mutual"`` also denoises a text-only stream from the
        same noise in the same batch, whose self-attention keys/values the identity stream attends to;
        ``adain="mean"`` (stylisation) or ``"full"`` aligns the identity stream's queries/keys to it.
        ``mode="plain"`` (``adain=None``) denoises the identity stream alone. ``identity_scale`` weighs the
        identity cross-attention added to the text one. Identity: :meth:`identity_tokens`. In
        ``callback_on_step_end(pipeline, step, t, {"latents": ...})`` (may return new ``latents``), they
        hold both streams, ``[identity; text]``, in the mixed modes.
        """
        height = height or self.default_sample_size * self.vae_scale_factor
        width = width or self.default_sample_size * self.vae_scale_factor
        self.check_inputs(
            prompt,
            None,
            height,
            width,
            None,
            negative_prompt=negative_prompt,
            callback_on_step_end_tensor_inputs=self._callback_tensor_inputs,
        )
        self._guidance_scale = guidance_scale
        self._interrupt = False
        device = self._execution_device
        batch_size = (1 if isinstance(prompt, str) else len(prompt)) * num_images_per_prompt

        identity = self.identity_tokens(id_images, id_embeddings, id_weights).expand(batch_size, -1, -1)
        if self.do_classifier_free_guidance:
            negative = self.unconditional_identity().expand(batch_size, -1, -1)
            identity = torch.cat([negative, identity])
        attention_kwargs = {
            "identity": identity,
            "identity_scale": identity_scale,
            "mode": mode,
            "adain": adain,
        }

        prompt_embeds, negative_prompt_embeds, pooled_embeds, negative_pooled_embeds = self.encode_prompt(
            prompt=prompt,
            device=device,
            num_images_per_prompt=num_images_per_prompt,
            do_classifier_free_guidance=self.do_classifier_free_guidance,
            negative_prompt=negative_prompt,
        )
        add_time_ids = self._get_add_time_ids(
            (height, width),
            (0, 0),
            (height, width),
            dtype=prompt_embeds.dtype,
            text_encoder_projection_dim=self.text_encoder_2.config.projection_dim,
        ).to(device)
        if self.do_classifier_free_guidance:
            prompt_embeds = torch.cat([negative_prompt_embeds, prompt_embeds])
            pooled_embeds = torch.cat([negative_pooled_embeds, pooled_embeds])
        streams = 1 if mode == "plain" else 2  # [identity; text]
        prompt_embeds = prompt_embeds.repeat(streams, 1, 1)
        added_conditions = {
            "text_embeds": pooled_embeds.repeat(streams, 1),
            "time_ids": add_time_ids.repeat(prompt_embeds.shape[0], 1),
        }

        self.scheduler.set_timesteps(num_inference_steps, device=device)
        timesteps = self.scheduler.timesteps
        self._num_timesteps = len(timesteps)
        latents = self.prepare_latents(
            batch_size,
            self.unet.config.in_channels,
            height,
            width,
            prompt_embeds.dtype,
            device,
            generator,
            latents,
        )
        latents = latents.repeat(streams, 1, 1, 1)
        extra_step_kwargs = self.prepare_extra_step_kwargs(generator, 0.0)

        with self.progress_bar(total=len(timesteps)) as progress_bar:
            for index, t in enumerate(timesteps):
                if self.interrupt:
                    continue
                noise = self.predict_noise(
                    latents, t, prompt_embeds, added_conditions, attention_kwargs, streams
                )
                latents = self.scheduler.step(noise, t, latents, **extra_step_kwargs, return_dict=False)[0]
                if callback_on_step_end is not None:
                    outputs = callback_on_step_end(self, index, t, {"latents": latents})
                    latents = outputs.pop("latents", latents)
                progress_bar.update()

        identity_latents = latents[:batch_size]
        if output_type == "latent":
            images = identity_latents
        else:
            images = self.decode(identity_latents, output_type)
        self.maybe_free_model_hooks()
        return StableDiffusionXLPipelineOutput(images=images) if return_dict else (images,)

    def predict_noise(
        self,
        latents: torch.Tensor,
        t: torch.Tensor,
        prompt_embeds: torch.Tensor,
        added_conditions: dict[str, torch.Tensor],
        attention_kwargs: dict[str, Any],
        streams: int,
    ) -> torch.Tensor:
        """Guided noise for ``latents`` (``[identity; text]`` streams): one UNet batch holding, per stream,
        its unconditional then conditional rows (``[id_u, id_c, text_u, text_c]`` with guidance)."""
        stream_latents = latents.chunk(streams)
        if self.do_classifier_free_guidance:
            stream_latents = [torch.cat([rows, rows]) for rows in stream_latents]
        model_input = self.scheduler.scale_model_input(torch.cat(stream_latents), t)
        noise = self.unet(
            model_input,
            t,
            encoder_hidden_states=prompt_embeds,
            added_cond_kwargs=added_conditions,
            cross_attention_kwargs=attention_kwargs,
            return_dict=False,
        )[0]
        if not self.do_classifier_free_guidance:
            return noise
        guided = []
        for stream_noise in noise.chunk(streams):
            unconditional, conditional = stream_noise.chunk(2)
            guided.append(unconditional + self.guidance_scale * (conditional - unconditional))
        return torch.cat(guided)

    def decode(self, latents: torch.Tensor, output_type: str) -> Any:
        """Latents -> images of ``output_type``; a float16 VAE that needs it (SDXL's) decodes in float32."""
        upcast = self.vae.dtype == torch.float16 and self.vae.config.force_upcast
        if upcast:
            self.vae.to(torch.float32)
        scaled = (latents / self.vae.config.scaling_factor).to(self.vae.dtype)
        decoded = self.vae.decode(scaled, return_dict=False)[0]
        if upcast:
            self.vae.to(torch.float16)
        return self.image_processor.postprocess(decoded, output_type=output_type)
