"""The attention processor installed on every block's self-attention: the frozen path plus, per
batch row, the sparse dictionary update the host planned for it."""

from __future__ import annotations

import torch
from diffusers.models.attention_processor import Attention, AttnProcessor2_0
from torch import nn

from adapters.sparse_dictionary.kernels import (
    add_dictionary_update,
    compute_coefficients,
    fused_attention,
    linear_with_slack,
    project_fused,
    reference_attention,
)
from adapters.sparse_dictionary.plan import LayerPlanner


class SparseDictionaryAttnProcessor:
    """Self-attention with the frozen path plus, per batch row, a sparse dictionary update.

    Installed once per adapted block; the ``planner`` (the ``AdapterHost``) tells it, per
    forward pass, which adapter serves which rows. With no adapter in the batch it runs the
    stock processor, so the base model's output is bit-identical.
    """

    def __init__(self, block: int, planner: LayerPlanner) -> None:
        self.block = block
        self.planner = planner
        self.plain = AttnProcessor2_0()

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
    ) -> torch.Tensor:
        groups = self.planner.plan(self.block, hidden_states.shape[0], hidden_states.device)
        if not groups or encoder_hidden_states is not None or hidden_states.ndim != 3:
            return self.plain(attn, hidden_states, encoder_hidden_states, attention_mask, temb)

        batch, tokens, _ = hidden_states.shape
        heads = attn.heads
        coefficients = compute_coefficients(hidden_states, groups, heads)  # (B, N, H, m_max)
        for observe in self.planner.observers:
            observe(self.block, coefficients.reshape(batch, tokens, -1))

        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, tokens, batch)
            attention_mask = attention_mask.view(batch, heads, -1, attention_mask.shape[-1])

        # q, k, v stay in the projections' (B, N, H, d) layout: the padded and stacked copies
        # below are then plain row copies, and SDPA takes the transposed views as they are.
        # out= has no autograd, so training takes the padded-copy path.
        query_has_slack = attn.norm_q is None and type(attn.to_q) is nn.Linear and not torch.is_grad_enabled()
        if query_has_slack:
            query = linear_with_slack(attn.to_q, hidden_states, coefficients.shape[-1])
        else:
            query = attn.to_q(hidden_states)
        query = query.view(batch, tokens, heads, -1)
        key = attn.to_k(hidden_states).view(batch, tokens, heads, -1)
        value = attn.to_v(hidden_states).view(batch, tokens, heads, -1)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        coefficients = coefficients.to(value.dtype)

        if self.planner.reference:
            both = reference_attention(query, key, value, coefficients, attention_mask, attn.scale)
        else:
            both = fused_attention(query, key, value, coefficients, attention_mask, attn.scale, query_has_slack)

        # The fused weights are built without autograd, so training (which needs D's gradient)
        # takes the two-product path.
        if not torch.is_grad_enabled() and all(
            g.output_weight is not None and g.output_weight.is_current(g.layer.dictionary) for g in groups
        ):
            output = attn.to_out[1](project_fused(both, groups, attn.to_out[0].bias))
        else:
            head_dim = value.shape[-1]
            attended = both[..., :head_dim].reshape(batch, tokens, -1).to(query.dtype)
            output = add_dictionary_update(attn.to_out[1](attn.to_out[0](attended)), both[..., head_dim:], groups)
        if attn.residual_connection:
            output = output + hidden_states
        # A division by 1 (PixArt's factor) would still cost a full pass over the output.
        return output if attn.rescale_output_factor == 1.0 else output / attn.rescale_output_factor

