"""SimSwap's generator (the 224 "Generator_Adain_Upsample") and the swapper running it on aligned crops.

Module names and order follow the released ``latest_net_G.pth`` so that it loads strictly: ``first_layer``
(reflection pad, 7x7 conv, BatchNorm, ReLU), ``down1..3`` (stride-2 convs), ``BottleNeck.<i>`` (residual
blocks: ``conv1``/``conv2`` = reflection pad, 3x3 conv, parameter-free instance norm, each followed by
``style1``/``style2.linear`` AdaIN from the identity latent), ``up3..1`` (bilinear x2, conv, BatchNorm,
ReLU) and ``last_layer`` (reflection pad, 7x7 conv, tanh). As in the release's 224 inference, the target
crop goes in as RGB in [0, 1] and ``(tanh + 1) / 2`` comes out.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
from torch import nn

from datagen.swap.base import AlignedCropSwapper, Restorer
from infu.quality.torch_utils import load_strict, read_state_dict, save_weights, seeded

RELEASE_EMBEDDING_DIM = 512
RELEASE_WIDTH = 64
RELEASE_BLOCKS = 9
CROP_SIZE = 224


class IdentityStyle(nn.Module):
    """AdaIN modulation: ``x * (1 + scale) + shift`` with scale and shift a linear map of the latent."""

    def __init__(self, embedding_dim: int, channels: int):
        super().__init__()
        self.linear = nn.Linear(embedding_dim, 2 * channels)

    def forward(self, features: torch.Tensor, latent: torch.Tensor) -> torch.Tensor:
        scale, shift = self.linear(latent).view(-1, 2, features.shape[1], 1, 1).unbind(dim=1)
        return features * (1.0 + scale) + shift


def _normalised_conv3x3(channels: int) -> nn.Sequential:
    """Reflection pad, 3x3 conv, instance norm without parameters (SimSwap's, epsilon 1e-8)."""
    return nn.Sequential(
        nn.ReflectionPad2d(1), nn.Conv2d(channels, channels, 3), nn.InstanceNorm2d(channels, eps=1e-8)
    )


class AdaINResidualBlock(nn.Module):
    """Two AdaIN-modulated 3x3 convs (ReLU between) added to the input."""

    def __init__(self, channels: int, embedding_dim: int):
        super().__init__()
        self.conv1 = _normalised_conv3x3(channels)
        self.style1 = IdentityStyle(embedding_dim, channels)
        self.conv2 = _normalised_conv3x3(channels)
        self.style2 = IdentityStyle(embedding_dim, channels)

    def forward(self, features: torch.Tensor, latent: torch.Tensor) -> torch.Tensor:
        update = torch.relu(self.style1(self.conv1(features), latent))
        return features + self.style2(self.conv2(update), latent)


def _down(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, stride=2, padding=1),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


def _up(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
        nn.Conv2d(in_channels, out_channels, 3, padding=1),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class SimSwapGenerator(nn.Module):
    """Encoder, ``blocks`` identity-conditioned residual blocks at 1/8 resolution, decoder.

    ``width`` is the first layer's channels (64 in the release; 2x, 4x, 8x down the encoder).
    """

    def __init__(
        self,
        embedding_dim: int = RELEASE_EMBEDDING_DIM,
        width: int = RELEASE_WIDTH,
        blocks: int = RELEASE_BLOCKS,
    ):
        super().__init__()
        if min(embedding_dim, width, blocks) < 1:
            raise ValueError(
                f"embedding_dim, width and blocks must be >= 1, got {embedding_dim}, {width}, {blocks}"
            )
        self.embedding_dim, self.width, self.blocks = embedding_dim, width, blocks
        self.first_layer = nn.Sequential(
            nn.ReflectionPad2d(3), nn.Conv2d(3, width, 7), nn.BatchNorm2d(width), nn.ReLU(inplace=True)
        )
        self.down1 = _down(width, 2 * width)
        self.down2 = _down(2 * width, 4 * width)
        self.down3 = _down(4 * width, 8 * width)
        self.BottleNeck = nn.ModuleList(AdaINResidualBlock(8 * width, embedding_dim) for _ in range(blocks))
        self.up3 = _up(8 * width, 4 * width)
        self.up2 = _up(4 * width, 2 * width)
        self.up1 = _up(2 * width, width)
        self.last_layer = nn.Sequential(nn.ReflectionPad2d(3), nn.Conv2d(width, 3, 7), nn.Tanh())

    def forward(self, target: torch.Tensor, latent: torch.Tensor) -> torch.Tensor:
        """``target`` [B, 3, H, W] RGB in [0, 1] (H, W multiples of 8), ``latent`` [B, D] -> [B, 3, H, W]
        in [0, 1]."""
        features = self.down3(self.down2(self.down1(self.first_layer(target))))
        for block in self.BottleNeck:
            features = block(features, latent)
        features = self.up1(self.up2(self.up3(features)))
        return (self.last_layer(features) + 1.0) / 2.0

    @classmethod
    def tiny(
        cls, embedding_dim: int = 128, width: int = 8, blocks: int = 2, seed: int = 0
    ) -> SimSwapGenerator:
        """The same architecture small and random-init (seeded), in eval mode.

        Convs are He-initialised and the AdaIN linears drawn with std 0.5, so that, unlike under torch's
        default init, the output is not a flat grey and visibly depends on the identity latent.
        """
        with seeded(seed):
            generator = cls(embedding_dim, width, blocks)
            for module in generator.modules():
                if isinstance(module, nn.Conv2d):
                    nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
                    nn.init.zeros_(module.bias)
                elif isinstance(module, IdentityStyle):
                    nn.init.normal_(module.linear.weight, std=0.5)
                    nn.init.zeros_(module.linear.bias)
            nn.init.kaiming_normal_(generator.last_layer[1].weight, nonlinearity="linear")
        return generator.eval()

    def save_pretrained(self, path: Path) -> Path:
        """Write the state dict (``.safetensors`` or a torch file, as the release); :meth:`from_pretrained`
        reads the architecture back from the tensor shapes."""
        return save_weights(self, path)

    @classmethod
    def from_pretrained(cls, path: Path) -> SimSwapGenerator:
        """A generator file (the released ``latest_net_G.pth`` or :meth:`save_pretrained`'s) loaded strictly:
        every key and shape must match; ValueError naming the file otherwise."""
        path = Path(path)
        state = read_state_dict(path)
        embedding_dim, width, blocks = architecture_of(state, path)
        generator = cls(embedding_dim, width, blocks)
        load_strict(generator, state, path)
        return generator.eval()


BLOCK_KEY = re.compile(r"^BottleNeck\.(\d+)\.")


def architecture_of(state: dict[str, torch.Tensor], source: Path) -> tuple[int, int, int]:
    """``(embedding_dim, width, blocks)`` of a generator state dict, read from its tensor shapes."""
    try:
        width = state["first_layer.1.weight"].shape[0]
        embedding_dim = state["BottleNeck.0.style1.linear.weight"].shape[1]
    except KeyError as error:
        raise ValueError(
            f"{source} does not fit SimSwapGenerator: it has no {error.args[0]} "
            f"(keys start {sorted(state)[:4]})"
        ) from error
    blocks = len({int(match.group(1)) for key in state if (match := BLOCK_KEY.match(key))})
    return int(embedding_dim), int(width), blocks


class SimSwapSwapper(AlignedCropSwapper):
    """SimSwap on the 224 ArcFace-aligned crop of the target face."""

    name: ClassVar[str] = "simswap"
    crop_size = CROP_SIZE

    def __init__(
        self,
        generator: SimSwapGenerator,
        device: str = "cpu",
        restore: Restorer | None = None,
        mask_feather: float = 0.1,
    ):
        super().__init__(restore, mask_feather)
        self.device = torch.device(device)
        self.generator = generator.eval().to(self.device)

    @property
    def embedding_dim(self) -> int:
        return self.generator.embedding_dim

    def swap_crop(self, crop: np.ndarray, embedding: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            target = torch.from_numpy(np.ascontiguousarray(crop)).to(self.device)
            target = target.permute(2, 0, 1)[None].float() / 255.0
            latent = torch.from_numpy(embedding[None].astype(np.float32)).to(self.device)
            out = self.generator(target, latent)[0].permute(1, 2, 0).clamp(0.0, 1.0)
            return (out * 255.0).round().to(torch.uint8).cpu().numpy()
