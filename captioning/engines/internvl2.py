"""InternVL2 through transformers' InternVL classes (``engine: transformers``, the default; runs anywhere).

Default prompt: ``Describe the person in this photo in one detailed sentence.``, sent as a chat turn
with the image (the model's chat template), batched with left padding.

``settings.model`` is an InternVL checkpoint in transformers' format (the ``-hf`` conversions such as
OpenGVLab/InternVL3-1B-hf, or an OpenGVLab/InternVL2-* model converted with transformers'
``convert_internvl_weights_to_hf.py``); the original remote-code folders are for ``engine: lmdeploy``.
Images are tiled by the processor (up to its ``max_patches`` tiles plus a thumbnail), so images of
different aspect ratios give prompts of different lengths within a batch.
"""

from __future__ import annotations

from typing import Any

from PIL import Image
from transformers import (
    BatchFeature,
    GotOcr2ImageProcessor,
    InternVLConfig,
    InternVLForConditionalGeneration,
    InternVLProcessor,
    InternVLVideoProcessor,
    Qwen2Config,
    Qwen2Tokenizer,
)

from captioning.config import NeuralCaptioner
from captioning.engines.base import PERSON_PROMPT, TINY_INIT_STD, TransformersCaptioner, byte_level_vocab

TINY_TILE = 32
TINY_PATCH = 8
TINY_IMAGE_TOKENS = (TINY_TILE // TINY_PATCH) ** 2 // 4
"""Tokens per tile: the 4x4 patches after InternVL's 2x2 pixel shuffle."""
IMAGE_TOKENS = {
    "start_image_token": "<img>",
    "end_image_token": "</img>",
    "context_image_token": "<IMG_CONTEXT>",
    "video_token": "<video>",
}
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}{{ '<IMG_CONTEXT>\\n' }}"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}"
    "{% endfor %}{% endif %}{{ '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
"""The ChatML template of the converted InternVL checkpoints (Qwen2 decoders), for the tiny model."""


class InternVL2TransformersCaptioner(TransformersCaptioner):
    """``InternVLForConditionalGeneration`` + ``InternVLProcessor``: a user turn (image, prompt) per image."""

    model_class = InternVLForConditionalGeneration
    processor_class = InternVLProcessor
    default_prompt = PERSON_PROMPT

    def __init__(self, settings: NeuralCaptioner) -> None:
        super().__init__(settings)
        turn: list[dict[str, Any]] = [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": self.prompt}]}
        ]
        self.chat_text = self.processor.apply_chat_template(turn, add_generation_prompt=True, tokenize=False)

    @classmethod
    def build_tiny(cls) -> tuple[InternVLForConditionalGeneration, InternVLProcessor]:
        specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", *IMAGE_TOKENS.values()]
        tokenizer = Qwen2Tokenizer(
            vocab=byte_level_vocab(specials),
            merges=[],
            eos_token="<|im_end|>",
            pad_token="<|endoftext|>",
            model_max_length=4096,
            extra_special_tokens=IMAGE_TOKENS,
        )
        tokenizer.add_special_tokens(
            {"additional_special_tokens": specials}, replace_extra_special_tokens=False
        )
        tile = {"height": TINY_TILE, "width": TINY_TILE}
        processor = InternVLProcessor(
            image_processor=GotOcr2ImageProcessor(
                size=tile,
                crop_to_patches=True,
                max_patches=4,
                image_mean=[0.485, 0.456, 0.406],
                image_std=[0.229, 0.224, 0.225],
            ),
            tokenizer=tokenizer,
            video_processor=InternVLVideoProcessor(size=tile),
            image_seq_length=TINY_IMAGE_TOKENS,
            chat_template=CHAT_TEMPLATE,
        )
        config = InternVLConfig(
            vision_config={
                "hidden_size": 32,
                "intermediate_size": 64,
                "num_hidden_layers": 2,
                "num_attention_heads": 2,
                "image_size": TINY_TILE,
                "patch_size": TINY_PATCH,
                "initializer_range": TINY_INIT_STD,
            },
            text_config=Qwen2Config(
                vocab_size=len(tokenizer),
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=2,
                num_attention_heads=2,
                num_key_value_heads=1,
                max_position_embeddings=4096,
                initializer_range=TINY_INIT_STD,
                bos_token_id=None,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            ),
            image_token_id=tokenizer.context_image_token_id,
            image_seq_length=TINY_IMAGE_TOKENS,
        )
        return InternVLForConditionalGeneration(config), processor

    def model_inputs(self, images: list[Image.Image]) -> BatchFeature:
        return self.processor(
            images=images, text=[self.chat_text] * len(images), padding=True, return_tensors="pt"
        )
