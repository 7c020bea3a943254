"""InfU FLUX pipeline: identity image(s) -> face embedding -> identity tokens -> InfuseNet-guided FLUX.

Prompt encoding, latent preparation/packing, the flow-matching schedule (with its resolution-dependent
shift ``mu``), LoRA loading and CPU offload come from diffusers' ``FluxPipeline``; the InfuseNet wiring
is :func:`infu.model.infusenet.infused_velocity`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
from diffusers.image_processor import PipelineImageInput, VaeImageProcessor
from diffusers.pipelines.flux.pipeline_flux import calculate_shift, retrieve_timesteps
from diffusers.pipelines.flux.pipeline_flux_controlnet import retrieve_latents
from diffusers.pipelines.flux.pipeline_output import FluxPipelineOutput
from diffusers.pipelines.pipeline_utils import DiffusionPipeline
from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

from infu.face import FaceAnalyzer, black_control, draw_keypoints_control
from infu.images import ImageInput
from infu.model.conditioning import identity_from_images, keypoint_control
from infu.model.config import InferenceConfig, LoraConfig
from infu.model.infusenet import InfuseNet, check_compatible, infused_velocity
from infu.model.projection import IdentityProjection

EmbeddingInput = torch.Tensor | np.ndarray


def _one_generator(generator: torch.Generator | list[torch.Generator] | None) -> torch.Generator | None:
    return generator[0] if isinstance(generator, list) else generator


class InfUFluxPipeline(FluxPipeline):
    """FLUX + InfuseNet + identity projection; the face analyzer is optional when embeddings are given."""

    model_cpu_offload_seq = "text_encoder->text_encoder_2->image_proj->infusenet->transformer->vae"
    _optional_components: list[str] = []  # FluxPipeline's IP-Adapter parts are not components here

    def __init__(
        self,
        scheduler: FlowMatchEulerDiscreteScheduler,
        vae: AutoencoderKL,
        text_encoder: CLIPTextModel,
        tokenizer: CLIPTokenizer,
        text_encoder_2: T5EncoderModel,
        tokenizer_2: T5TokenizerFast,
        transformer: FluxTransformer2DModel,
        infusenet: InfuseNet,
        image_proj: IdentityProjection,
        face_analyzer: FaceAnalyzer | None = None,
        inference: InferenceConfig | None = None,
    ):
        DiffusionPipeline.__init__(self)
        check_compatible(transformer, infusenet)
        if image_proj.config.output_dim != infusenet.config.joint_attention_dim:
            raise ValueError(
                f"the projection's output_dim {image_proj.config.output_dim} must equal the InfuseNet's "
                f"joint_attention_dim {infusenet.config.joint_attention_dim}"
            )
        self.register_modules(
            vae=vae,
            text_encoder=text_encoder,
            text_encoder_2=text_encoder_2,
            tokenizer=tokenizer,
            tokenizer_2=tokenizer_2,
            transformer=transformer,
            infusenet=infusenet,
            image_proj=image_proj,
            scheduler=scheduler,
        )
        if face_analyzer is not None and face_analyzer.embedding_dim != image_proj.config.embedding_dim:
            raise ValueError(
                f"the {face_analyzer.backend} face backend gives {face_analyzer.embedding_dim}-D "
                f"embeddings but the projection expects {image_proj.config.embedding_dim}-D"
            )
        if face_analyzer is not None and face_analyzer.embedding_space != image_proj.config.embedding_space:
            raise ValueError(
                f"the face analyzer embeds into {face_analyzer.embedding_space} but the projection was "
                f"trained on {image_proj.config.embedding_space} embeddings: set face.recognizer to "
                f"{image_proj.config.embedding_space}"
            )
        self.face_analyzer = face_analyzer
        self.inference = inference or InferenceConfig()
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor * 2)
        self.tokenizer_max_length = tokenizer.model_max_length

    # identity ---------------------------------------------------------------------------------------

    def _analyzer(self, purpose: str) -> FaceAnalyzer:
        if self.face_analyzer is None:
            raise ValueError(f"{purpose} needs a face analyzer; build the pipeline with one")
        return self.face_analyzer

    def identity_embedding(
        self,
        id_image: ImageInput | Sequence[ImageInput] | None = None,
        id_embedding: EmbeddingInput | None = None,
        id_weights: Sequence[float] | None = None,
    ) -> torch.Tensor:
        """``[N, D]`` unit embeddings: of one id image, a weighted mix of several, or given directly.

        A given ``id_embedding`` is ``[D]`` (one identity) or ``[B, D]`` (one per prompt).
        """
        if (id_image is None) == (id_embedding is None):
            raise ValueError("pass exactly one of id_image and id_embedding")
        if id_embedding is None:
            images = list(id_image) if isinstance(id_image, (list, tuple)) else [id_image]
            return identity_from_images(self._analyzer("an id image"), images, id_weights)[None]
        if id_weights is not None:
            raise ValueError("id_weights mix id images; mix given embeddings with mix_identities()")
        embedding = torch.as_tensor(id_embedding, dtype=torch.float32)
        return torch.nn.functional.normalize(embedding.reshape(-1, embedding.shape[-1]), dim=-1)

    def encode_identity(self, embedding: torch.Tensor, batch_size: int, device: torch.device) -> torch.Tensor:
        """``[N, D]`` embeddings -> ``[batch_size, num_queries, joint_attention_dim]`` identity tokens."""
        if embedding.shape[0] not in (1, batch_size):
            raise ValueError(f"{embedding.shape[0]} identity embeddings for a batch of {batch_size}")
        tokens = self.image_proj(embedding.to(device=device, dtype=self.image_proj.dtype))
        return tokens.expand(batch_size, -1, -1).to(self.infusenet.dtype)

    # control ------------------------------------------------------------------------------------------

    def control_for(
        self,
        width: int,
        height: int,
        control_image: ImageInput | None = None,
        control_drawing: PipelineImageInput | None = None,
        control_keypoints: np.ndarray | None = None,
    ) -> PipelineImageInput:
        """The InfuseNet control: keypoints found in the pose photo ``control_image`` (as the release finds
        them) or given, drawn; a ``control_drawing`` as is; or black."""
        if sum(item is not None for item in (control_image, control_drawing, control_keypoints)) > 1:
            raise ValueError("pass at most one of control_image, control_drawing and control_keypoints")
        if control_image is not None:
            analyzer = self._analyzer("control_image (a pose photo)")
            return keypoint_control(analyzer, control_image, width, height)
        if control_drawing is not None:
            return control_drawing
        if control_keypoints is not None:
            return draw_keypoints_control((width, height), np.asarray(control_keypoints, dtype=np.float32))
        return black_control((width, height))

    def encode_control(
        self,
        control: PipelineImageInput,
        width: int,
        height: int,
        batch_size: int,
        device: torch.device,
        generator: torch.Generator | list[torch.Generator] | None,
    ) -> torch.Tensor:
        """Control image(s) -> packed VAE latents ``[batch_size, L, 4 * latent_channels]``."""
        pixels = self.image_processor.preprocess(control, height=height, width=width)
        if pixels.shape[0] not in (1, batch_size):
            raise ValueError(f"{pixels.shape[0]} control images for a batch of {batch_size}")
        pixels = pixels.to(device=device, dtype=self.vae.dtype)
        latents = retrieve_latents(self.vae.encode(pixels), generator=_one_generator(generator))
        latents = (latents - self.vae.config.shift_factor) * self.vae.config.scaling_factor
        count, channels, latent_height, latent_width = latents.shape
        packed = self._pack_latents(latents, count, channels, latent_height, latent_width)
        return packed.expand(batch_size, -1, -1).to(self.infusenet.dtype)

    # LoRAs --------------------------------------------------------------------------------------------

    def apply_loras(
        self, loras: Sequence[LoraConfig], root: Path | None = None, fuse: bool = False
    ) -> list[str]:
        """Load LoRAs into the base transformer with their scales (optionally fused); returns adapter names.

        Relative paths are read from ``root`` when given (the release keeps LoRAs in its checkpoint root).
        """
        names = []
        for lora in loras:
            path = lora.path if root is None or lora.path.is_absolute() else root / lora.path
            name = lora.adapter_name or path.stem
            self.load_lora_weights(str(path), adapter_name=name)
            names.append(name)
        if names:
            self.set_adapters(names, adapter_weights=[lora.scale for lora in loras])
            if fuse:
                self.fuse_lora(adapter_names=names)
        return names

    # sampling -----------------------------------------------------------------------------------------

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        id_image: ImageInput | Sequence[ImageInput] | None = None,
        id_embedding: EmbeddingInput | None = None,
        id_weights: Sequence[float] | None = None,
        control_image: ImageInput | None = None,
        control_drawing: PipelineImageInput | None = None,
        control_keypoints: np.ndarray | None = None,
        width: int | None = None,
        height: int | None = None,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        infusenet_conditioning_scale: float | None = None,
        infusenet_guidance_scale: float | None = None,
        infusenet_guidance_start: float | None = None,
        infusenet_guidance_end: float | None = None,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        pooled_prompt_embeds: torch.Tensor | None = None,
        max_sequence_length: int | None = None,
        joint_attention_kwargs: dict | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
    ) -> FluxPipelineOutput | tuple:
        """Generate images of one identity (or one per prompt) for a prompt or a batch of prompts.

        Identity: ``id_image`` (one image, or several mixed with ``id_weights``) through the face
        analyzer, or ``id_embedding`` directly. Control (at most one): ``control_image``, a pose photo
        resized and padded to the output size as the release does, whose largest face's keypoints are
        drawn; ``control_drawing``, an already drawn control image; ``control_keypoints`` in output pixels;
        or none, a black image. Unset knobs take the pipeline's :class:`InferenceConfig`; ``generator``
        makes the noise reproducible.
        """
        overrides = {
            "width": width,
            "height": height,
            "num_steps": num_inference_steps,
            "guidance_scale": guidance_scale,
            "infusenet_conditioning_scale": infusenet_conditioning_scale,
            "infusenet_guidance_scale": infusenet_guidance_scale,
            "infusenet_guidance_start": infusenet_guidance_start,
            "infusenet_guidance_end": infusenet_guidance_end,
            "max_sequence_length": max_sequence_length,
        }
        settings = InferenceConfig.model_validate(
            {
                **self.inference.model_dump(),
                **{key: value for key, value in overrides.items() if value is not None},
            }
        )
        width, height, steps = settings.width, settings.height, settings.num_steps
        self.check_inputs(
            prompt,
            None,
            height,
            width,
            prompt_embeds=prompt_embeds,
            pooled_prompt_embeds=pooled_prompt_embeds,
            max_sequence_length=settings.max_sequence_length,
        )
        num_prompts = (
            1 if isinstance(prompt, str) else len(prompt) if prompt is not None else len(prompt_embeds)
        )
        batch_size = num_prompts * num_images_per_prompt
        device = self._execution_device
        lora_scale = (joint_attention_kwargs or {}).get("scale")

        embedding = self.identity_embedding(id_image, id_embedding, id_weights)
        if embedding.shape[0] not in (1, num_prompts):
            raise ValueError(f"{embedding.shape[0]} identity embeddings for {num_prompts} prompts")
        embedding = (
            embedding.repeat_interleave(num_images_per_prompt, dim=0) if embedding.shape[0] > 1 else embedding
        )
        control = self.control_for(width, height, control_image, control_drawing, control_keypoints)

        prompt_embeds, pooled_prompt_embeds, text_ids = self.encode_prompt(
            prompt=prompt,
            prompt_2=None,
            prompt_embeds=prompt_embeds,
            pooled_prompt_embeds=pooled_prompt_embeds,
            device=device,
            num_images_per_prompt=num_images_per_prompt,
            max_sequence_length=settings.max_sequence_length,
            lora_scale=lora_scale,
        )
        id_tokens = self.encode_identity(embedding, batch_size, device)
        control_latents = self.encode_control(control, width, height, batch_size, device, generator)
        latents, latent_image_ids = self.prepare_latents(
            batch_size,
            self.transformer.config.in_channels // 4,
            height,
            width,
            prompt_embeds.dtype,
            device,
            generator,
            latents,
        )

        sigmas = np.linspace(1.0, 1 / steps, steps)
        mu = calculate_shift(
            latents.shape[1],
            self.scheduler.config.get("base_image_seq_len", 256),
            self.scheduler.config.get("max_image_seq_len", 4096),
            self.scheduler.config.get("base_shift", 0.5),
            self.scheduler.config.get("max_shift", 1.15),
        )
        timesteps, steps = retrieve_timesteps(self.scheduler, steps, device, sigmas=sigmas, mu=mu)
        self._num_timesteps = len(timesteps)
        self.scheduler.set_begin_index(0)

        with self.progress_bar(total=steps) as progress_bar:
            for index, t in enumerate(timesteps):
                active = settings.infusenet_guidance_start <= index / steps and (
                    (index + 1) / steps <= settings.infusenet_guidance_end
                )
                velocity = infused_velocity(
                    self.transformer,
                    self.infusenet,
                    latents=latents,
                    timestep=t.expand(batch_size).to(latents.dtype) / 1000,
                    prompt_embeds=prompt_embeds,
                    pooled_prompt_embeds=pooled_prompt_embeds,
                    text_ids=text_ids,
                    img_ids=latent_image_ids,
                    id_tokens=id_tokens,
                    control_latents=control_latents,
                    guidance_scale=settings.guidance_scale,
                    infusenet_guidance_scale=settings.infusenet_guidance_scale,
                    infusenet_scale=settings.infusenet_conditioning_scale if active else 0.0,
                    joint_attention_kwargs=joint_attention_kwargs,
                )
                latents = self.scheduler.step(velocity, t, latents, return_dict=False)[0]
                progress_bar.update()

        if output_type == "latent":
            images = latents
        else:
            latents = self._unpack_latents(latents, height, width, self.vae_scale_factor)
            latents = latents / self.vae.config.scaling_factor + self.vae.config.shift_factor
            decoded = self.vae.decode(latents.to(self.vae.dtype), return_dict=False)[0]
            images = self.image_processor.postprocess(decoded, output_type=output_type)
        self.maybe_free_model_hooks()
        return FluxPipelineOutput(images=images) if return_dict else (images,)
