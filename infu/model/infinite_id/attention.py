"""Infinite-ID attention processors for SDXL's UNet: identity cross-attention and mixed self-attention.

Everything is steered per call through ``UNet2DConditionModel.forward(..., cross_attention_kwargs=...)`` with
the keys in :data:`ATTENTION_KWARGS`: ``identity`` (identity tokens), ``text_scale``, ``identity_scale``,
``mode`` and ``adain``. Diffusers hands the same kwargs to every processor and silently-but-noisily drops
(``Attention.forward`` logs a warning per call) any name missing from the processor's ``__call__``
signature, so both processors declare all five and read the ones they need.

Batch layout: in ``mode="plain"`` every row is one sample of a single stream (identity-enhanced training,
or IP-Adapter-like inference). In ``"mixed"`` and ``"mutual"`` the batch is ``[identity stream; text
stream]``: the first half is denoised with the identity, the second half is the text-only stream, row ``i``
of one half pairing with row ``i`` of the other.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention
from torch import nn

ATTENTION_KWARGS = ("identity", "text_scale", "identity_scale", "mode", "adain")
MODES = ("plain", "mixed", "mutual")
ADAIN_KINDS = (None, "mean", "full")
ADAIN_EPS = 1e-5


def adain_mean(content: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """AdaIN-mean: shift ``content``'s per-channel mean over tokens to ``reference``'s; ``[B, N, C]``."""
    return content - content.mean(dim=1, keepdim=True) + reference.mean(dim=1, keepdim=True)


def _mean_std(features: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    mean = features.mean(dim=1, keepdim=True)
    variance = features.var(dim=1, keepdim=True, unbiased=False)
    return mean, (variance + eps).sqrt()


def adain(content: torch.Tensor, reference: torch.Tensor, eps: float = ADAIN_EPS) -> torch.Tensor:
    """AdaIN: give ``content`` ``reference``'s per-channel mean and std over tokens; ``[B, N, C]``."""
    content_mean, content_std = _mean_std(content, eps)
    reference_mean, reference_std = _mean_std(reference, eps)
    return (content - content_mean) / content_std * reference_std + reference_mean


ADAIN_FUNCTIONS = {"mean": adain_mean, "full": adain}


def _check_mode(mode: str, adain_kind: str | None) -> None:
    if mode not in MODES:
        raise ValueError(f"attention mode must be one of {MODES}, got {mode!r}")
    if adain_kind not in ADAIN_KINDS:
        raise ValueError(f"adain must be one of {ADAIN_KINDS}, got {adain_kind!r}")
    if adain_kind is not None and mode == "plain":
        raise ValueError("adain aligns the identity stream to the text stream: use mode 'mixed' or 'mutual'")


def _identity_rows(mode: str, batch: int) -> int:
    """How many leading rows of the batch belong to the identity stream."""
    if mode == "plain":
        return batch
    if batch % 2:
        raise ValueError(f"mode {mode!r} needs a batch of [identity stream; text stream] halves, got {batch}")
    return batch // 2


def _to_tokens(attn: Attention, hidden_states: torch.Tensor, temb: torch.Tensor | None):
    """The input as ``[B, N, C]`` tokens (after the layer's own norms) and its spatial shape, if any."""
    if attn.spatial_norm is not None:
        hidden_states = attn.spatial_norm(hidden_states, temb)
    spatial_shape = None
    if hidden_states.ndim == 4:
        batch, channels, height, width = hidden_states.shape
        spatial_shape = (channels, height, width)
        hidden_states = hidden_states.view(batch, channels, height * width).transpose(1, 2)
    if attn.group_norm is not None:
        hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
    return hidden_states, spatial_shape


def _project_out(
    attn: Attention, output: torch.Tensor, residual: torch.Tensor, spatial_shape: tuple | None
) -> torch.Tensor:
    output = attn.to_out[1](attn.to_out[0](output))
    if spatial_shape is not None:
        output = output.transpose(-1, -2).reshape(output.shape[0], *spatial_shape)
    if attn.residual_connection:
        output = output + residual
    return output / attn.rescale_output_factor


def _attend(
    attn: Attention,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Multi-head ``softmax(Q K^T / sqrt(d)) V`` on ``[B, N, inner]`` projections (AttnProcessor2_0's ops)."""
    batch = query.shape[0]
    head_dim = key.shape[-1] // attn.heads
    query = query.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
    key = key.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
    value = value.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
    if attn.norm_q is not None:
        query = attn.norm_q(query)
    if attn.norm_k is not None:
        key = attn.norm_k(key)
    output = F.scaled_dot_product_attention(
        query, key, value, attn_mask=attention_mask, dropout_p=0.0, is_causal=False
    )
    return output.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype)


class IdentityCrossAttnProcessor(nn.Module):
    """Cross-attention (``attn2``) with an added image cross-attention on the identity tokens.

    Output = ``text_scale`` x text cross-attention + ``identity_scale`` x identity cross-attention (the
    paper's cross-attention merge), both from the same queries; the identity keys/values come from the
    trainable ``to_k_id``/``to_v_id`` (IP-Adapter's decoupled cross-attention). ``text_scale=0`` skips the
    text branch, so the frozen text ``to_k``/``to_v`` get no gradient (identity-enhanced training). In the
    two-stream modes only the identity half is merged; the text half gets plain text cross-attention.
    """

    def __init__(self, hidden_size: int, identity_dim: int):
        super().__init__()
        self.to_k_id = nn.Linear(identity_dim, hidden_size, bias=False)
        self.to_v_id = nn.Linear(identity_dim, hidden_size, bias=False)

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        identity: torch.Tensor | None = None,
        text_scale: float = 1.0,
        identity_scale: float = 1.0,
        mode: str = "plain",
        adain: str | None = None,
        **kwargs,
    ) -> torch.Tensor:
        """``identity``: ``[identity rows or 1, tokens, identity_dim]``; ``adain`` is the self-attention's."""
        _check_mode(mode, adain)
        if encoder_hidden_states is None:
            raise ValueError("IdentityCrossAttnProcessor serves cross-attention layers (attn2) only")
        residual = hidden_states
        tokens, spatial_shape = _to_tokens(attn, hidden_states, temb)
        batch = tokens.shape[0]
        rows = _identity_rows(mode, batch)
        query = attn.to_q(tokens)

        merged = torch.zeros_like(query[:rows])
        text_start = 0 if text_scale != 0 else rows
        text_output = None
        if text_start < batch:
            if attn.norm_cross:
                encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
            context = encoder_hidden_states[text_start:]
            mask = None
            if attention_mask is not None:
                mask = attn.prepare_attention_mask(attention_mask, encoder_hidden_states.shape[1], batch)
                mask = mask.view(batch, attn.heads, -1, mask.shape[-1])[text_start:]
            text_output = _attend(attn, query[text_start:], attn.to_k(context), attn.to_v(context), mask)
            if text_scale != 0:
                merged = text_scale * text_output[:rows]
        if identity is not None and identity_scale != 0:
            identity = self._identity_for_rows(identity, rows)
            identity_output = _attend(attn, query[:rows], self.to_k_id(identity), self.to_v_id(identity))
            merged = merged + identity_scale * identity_output

        output = merged if rows == batch else torch.cat([merged, text_output[rows - text_start :]])
        return _project_out(attn, output, residual, spatial_shape)

    @staticmethod
    def _identity_for_rows(identity: torch.Tensor, rows: int) -> torch.Tensor:
        if identity.ndim != 3 or identity.shape[0] not in (1, rows):
            raise ValueError(
                f"identity tokens must be [{rows} (identity-stream rows) or 1, tokens, dim], "
                f"got {tuple(identity.shape)}"
            )
        return identity.expand(rows, -1, -1)


class MixedSelfAttnProcessor:
    """Self-attention (``attn1``): plain, or Infinite-ID's mixed / mutual attention between two streams.

    ``mode="plain"``: ordinary self-attention (as ``AttnProcessor2_0``). ``"mixed"``: the batch is
    ``[identity stream; text stream]``; the text half runs plain self-attention, the identity half's queries
    attend to ``K = [K_id, K_t]``, ``V = [V_id, V_t]``. ``"mutual"`` (ablation): the identity half attends
    to ``[K_t]``, ``[V_t]`` only.

    ``adain="mean"`` (AdaIN-mean, for stylisation) or ``"full"`` (AdaIN, ablation) aligns the identity
    stream's queries and keys to the text stream's, per channel over pixels, before the attention:
    ``Q_id <- AdaIN(Q_id, Q_t)``, ``K_id <- AdaIN(K_id, K_t)``. That is our reading of the paper's
    mixed-attention equations, which follow StyleAligned's shared attention: moving the identity queries'
    and keys' means onto the text stream's shifts which tokens (and so which style) the identity stream
    attends to (AdaIN-mean keeps their per-channel variance), while the output stays a mix of real ``V`` rows.
    """

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        identity: torch.Tensor | None = None,
        text_scale: float = 1.0,
        identity_scale: float = 1.0,
        mode: str = "plain",
        adain: str | None = None,
        **kwargs,
    ) -> torch.Tensor:
        """``identity``, ``text_scale`` and ``identity_scale`` are the cross-attention's and unused here."""
        _check_mode(mode, adain)
        residual = hidden_states
        tokens, spatial_shape = _to_tokens(attn, hidden_states, temb)
        batch = tokens.shape[0]
        context = tokens
        if encoder_hidden_states is not None:
            context = encoder_hidden_states
            if attn.norm_cross:
                context = attn.norm_encoder_hidden_states(context)
        query, key, value = attn.to_q(tokens), attn.to_k(context), attn.to_v(context)

        if mode == "plain":
            mask = None
            if attention_mask is not None:
                mask = attn.prepare_attention_mask(attention_mask, context.shape[1], batch)
                mask = mask.view(batch, attn.heads, -1, mask.shape[-1])
            output = _attend(attn, query, key, value, mask)
        else:
            if attention_mask is not None:
                raise ValueError(f"mode {mode!r} does not support an attention mask")
            rows = _identity_rows(mode, batch)
            query_id, query_text = query[:rows], query[rows:]
            key_id, key_text = key[:rows], key[rows:]
            value_id, value_text = value[:rows], value[rows:]
            if adain is not None:
                align = ADAIN_FUNCTIONS[adain]
                query_id, key_id = align(query_id, query_text), align(key_id, key_text)
            if mode == "mixed":
                key_id = torch.cat([key_id, key_text], dim=1)
                value_id = torch.cat([value_id, value_text], dim=1)
            else:
                key_id, value_id = key_text, value_text
            output = torch.cat(
                [
                    _attend(attn, query_id, key_id, value_id),
                    _attend(attn, query_text, key_text, value_text),
                ]
            )
        return _project_out(attn, output, residual, spatial_shape)


def _processor_key(processor_name: str) -> str:
    """``down_blocks.1....attn2.processor`` -> ``down_blocks_1_..._attn2`` (a valid module name)."""
    return processor_name.removesuffix(".processor").replace(".", "_")


def identity_layer_dims(unet: nn.Module) -> dict[str, int]:
    """Every cross-attention layer (``attn2``) of ``unet``, keyed for the identity K/V, -> its K/V width."""
    dims = {}
    for name in unet.attn_processors:
        if name.endswith("attn2.processor"):
            attn = unet.get_submodule(name.removesuffix(".processor"))
            dims[_processor_key(name)] = attn.to_k.out_features
    if not dims:
        raise ValueError(f"{type(unet).__name__} has no cross-attention (attn2) layers")
    return dims


def build_identity_processors(layer_dims: dict[str, int], identity_dim: int) -> nn.ModuleDict:
    """One :class:`IdentityCrossAttnProcessor` per cross-attention layer, from :func:`identity_layer_dims`."""
    return nn.ModuleDict(
        {
            key: IdentityCrossAttnProcessor(hidden_size, identity_dim)
            for key, hidden_size in layer_dims.items()
        }
    )


def attach_identity_processors(unet: nn.Module, processors: nn.ModuleDict) -> None:
    """Set ``processors`` on ``unet``'s ``attn2`` layers and a :class:`MixedSelfAttnProcessor` on ``attn1``.

    The processors become submodules of the UNet too (as with IP-Adapter): parameters are shared, so a later
    ``unet.requires_grad_(False)`` also freezes them; freeze the base before attaching.
    """
    layer_dims = identity_layer_dims(unet)
    missing = sorted(set(layer_dims) - set(processors))
    unexpected = sorted(set(processors) - set(layer_dims))
    if missing or unexpected:
        raise ValueError(
            f"identity processors do not match the UNet: missing {missing}, not in the UNet {unexpected}"
        )
    for key, hidden_size in layer_dims.items():
        if processors[key].to_k_id.out_features != hidden_size:
            raise ValueError(
                f"identity processor {key} is {processors[key].to_k_id.out_features} wide, "
                f"the UNet layer {hidden_size}"
            )
    self_attention = MixedSelfAttnProcessor()
    for name in unet.attn_processors:
        attn = unet.get_submodule(name.removesuffix(".processor"))
        if name.endswith("attn2.processor"):
            attn.set_processor(processors[_processor_key(name)])
        elif name.endswith("attn1.processor"):
            attn.set_processor(self_attention)


def install_identity_processors(unet: nn.Module, identity_dim: int) -> nn.ModuleDict:
    """Fresh identity processors on every ``attn2``, mixed self-attention on ``attn1``; returns the former."""
    processors = build_identity_processors(identity_layer_dims(unet), identity_dim)
    processors.to(device=unet.device, dtype=unet.dtype)
    attach_identity_processors(unet, processors)
    return processors
