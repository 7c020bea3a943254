"""Small captioners that run on CPU in production too: GIT (e.g. microsoft/git-base-coco) and BLIP base
(e.g. Salesforce/blip-image-captioning-base).

Default prompt: none (plain captioning; GIT's COCO fine-tune has no prefix). A prompt makes the caption
a continuation of it (conditional captioning), and the caption holds the continuation only: BLIP's
captioning fine-tune used the prefix ``a picture of``, which BLIP's own code sets and strips the same way.
"""

from __future__ import annotations

from typing import Any

import torch
from PIL import Image
from transformers import (
    BatchFeature,
    BertTokenizer,
    BlipConfig,
    BlipForConditionalGeneration,
    BlipImageProcessor,
    BlipProcessor,
    CLIPImageProcessor,
    GitConfig,
    GitForCausalLM,
    GitProcessor,
)

from captioning.engines.base import TINY_INIT_STD, TransformersCaptioner, wordpiece_vocab

TINY_IMAGE_SIZE = 32
TINY_VISION: dict[str, Any] = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "image_size": TINY_IMAGE_SIZE,
    "patch_size": 8,
    "initializer_range": TINY_INIT_STD,
}
"""A ViT of 4x4 patches of 8 px, the vision tower of both tiny models."""
TINY_TEXT: dict[str, Any] = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "max_position_embeddings": 128,
    "initializer_range": TINY_INIT_STD,
}
BERT_SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


class GitCaptioner(TransformersCaptioner):
    """``GitForCausalLM``: the image tokens, then [CLS] and the prompt start the text it continues."""

    model_class = GitForCausalLM
    processor_class = GitProcessor

    @classmethod
    def build_tiny(cls) -> tuple[GitForCausalLM, GitProcessor]:
        tokenizer = BertTokenizer(vocab=wordpiece_vocab(BERT_SPECIAL_TOKENS), model_max_length=512)
        config = GitConfig(
            vision_config=TINY_VISION,
            vocab_size=len(tokenizer),
            **TINY_TEXT,
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.cls_token_id,
            eos_token_id=tokenizer.sep_token_id,
        )
        image_processor = CLIPImageProcessor(
            size={"shortest_edge": TINY_IMAGE_SIZE},
            crop_size={"height": TINY_IMAGE_SIZE, "width": TINY_IMAGE_SIZE},
        )
        return GitForCausalLM(config), GitProcessor(image_processor=image_processor, tokenizer=tokenizer)

    def model_inputs(self, images: list[Image.Image]) -> BatchFeature:
        inputs = self.processor(images=images, return_tensors="pt")
        tokenizer = self.processor.tokenizer
        start = [tokenizer.cls_token_id, *tokenizer(self.prompt or "", add_special_tokens=False).input_ids]
        inputs["input_ids"] = torch.tensor([start] * len(images))
        return inputs


class BlipCaptioner(TransformersCaptioner):
    """``BlipForConditionalGeneration``: its text decoder starts from [DEC] and the prompt."""

    model_class = BlipForConditionalGeneration
    processor_class = BlipProcessor

    @classmethod
    def build_tiny(cls) -> tuple[BlipForConditionalGeneration, BlipProcessor]:
        tokenizer = BertTokenizer(vocab=wordpiece_vocab(BERT_SPECIAL_TOKENS), model_max_length=512)
        tokenizer.add_special_tokens({"bos_token": "[DEC]"})
        config = BlipConfig(
            vision_config=TINY_VISION,
            text_config={
                **TINY_TEXT,
                "vocab_size": len(tokenizer),
                "encoder_hidden_size": TINY_VISION["hidden_size"],
                "pad_token_id": tokenizer.pad_token_id,
                "bos_token_id": tokenizer.bos_token_id,
                "sep_token_id": tokenizer.sep_token_id,
                "eos_token_id": tokenizer.sep_token_id,
            },
            projection_dim=32,
            image_text_hidden_size=32,
        )
        image_processor = BlipImageProcessor(size={"height": TINY_IMAGE_SIZE, "width": TINY_IMAGE_SIZE})
        return BlipForConditionalGeneration(config), BlipProcessor(image_processor, tokenizer)

    def model_inputs(self, images: list[Image.Image]) -> BatchFeature:
        return self.processor(images=images, text=[self.prompt or ""] * len(images), return_tensors="pt")

    def prompt_length(self, inputs: BatchFeature) -> int:
        # generate swaps [CLS] for [DEC] and drops the closing [SEP]: the output starts with [DEC] + prompt
        return int(inputs["input_ids"].shape[1]) - 1
