"""BLIP-2 through transformers (``engine: transformers``, the default), e.g. Salesforce/blip2-opt-2.7b.

Default prompt: none. BLIP-2 OPT captions from its query tokens and [BOS] alone (how it was pre-trained
to caption), the plain caption wanted here; its ``Question: ... Answer:`` format is for short answers.
A prompt such as ``a photo of`` is continued, and the caption holds the continuation only.

``settings.model`` is a transformers BLIP-2 folder whose processor knows ``num_query_tokens`` (every
current Salesforce/blip2-* snapshot); the OPT decoder is part of it.
"""

from __future__ import annotations

from PIL import Image
from transformers import (
    BatchFeature,
    Blip2Config,
    Blip2ForConditionalGeneration,
    Blip2Processor,
    BlipImageProcessor,
    GPT2Tokenizer,
    OPTConfig,
)

from captioning.engines.base import TINY_INIT_STD, TransformersCaptioner, byte_level_vocab

TINY_IMAGE_SIZE = 32
TINY_QUERY_TOKENS = 4
TINY_WIDTH = 32


class Blip2TransformersCaptioner(TransformersCaptioner):
    """``Blip2ForConditionalGeneration``: the Q-Former's query tokens, [BOS] and the prompt start the OPT
    decoder's text."""

    model_class = Blip2ForConditionalGeneration
    processor_class = Blip2Processor

    @classmethod
    def build_tiny(cls) -> tuple[Blip2ForConditionalGeneration, Blip2Processor]:
        # OPT's tokenizer: byte-level BPE, </s> both begins and ends a text, <pad> pads
        tokenizer = GPT2Tokenizer(
            vocab=byte_level_vocab(["<s>", "<pad>", "</s>", "<unk>"]),
            merges=[],
            bos_token="</s>",
            eos_token="</s>",
            unk_token="<unk>",
            pad_token="<pad>",
            add_bos_token=True,
            model_max_length=512,
        )
        processor = Blip2Processor(
            BlipImageProcessor(size={"height": TINY_IMAGE_SIZE, "width": TINY_IMAGE_SIZE}),
            tokenizer,
            num_query_tokens=TINY_QUERY_TOKENS,
        )  # adds the <image> token to the tokenizer
        layers = {"num_hidden_layers": 2, "num_attention_heads": 2, "initializer_range": TINY_INIT_STD}
        config = Blip2Config(
            vision_config={
                **layers,
                "hidden_size": TINY_WIDTH,
                "intermediate_size": 64,
                "image_size": TINY_IMAGE_SIZE,
                "patch_size": 8,
            },
            qformer_config={
                **layers,
                "vocab_size": 64,
                "hidden_size": TINY_WIDTH,
                "intermediate_size": 64,
                "encoder_hidden_size": TINY_WIDTH,
                "max_position_embeddings": 64,
            },
            text_config=OPTConfig(
                vocab_size=len(tokenizer),
                hidden_size=TINY_WIDTH,
                word_embed_proj_dim=TINY_WIDTH,
                ffn_dim=64,
                num_hidden_layers=2,
                num_attention_heads=2,
                max_position_embeddings=128,
                init_std=TINY_INIT_STD,
                pad_token_id=tokenizer.pad_token_id,
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
            ),
            num_query_tokens=TINY_QUERY_TOKENS,
            image_token_index=tokenizer.get_vocab()["<image>"],
            image_text_hidden_size=TINY_WIDTH,
            initializer_range=TINY_INIT_STD,
        )
        return Blip2ForConditionalGeneration(config), processor

    def model_inputs(self, images: list[Image.Image]) -> BatchFeature:
        return self.processor(images=images, text=[self.prompt or ""] * len(images), return_tensors="pt")
