"""The adapter's arithmetic inside attention: σ and top-k, the coefficients of every row group,
A·V and A·S from one SDPA call (fused) or with the map written out (reference), and the output
projections.

The M coefficient channels are split evenly across the H heads; head h mixes its M/H channels
with its own attention map A^(h). ``A·S`` is computed in the same scaled-dot-product-attention
call as the frozen ``A·V`` by appending S to V, so the attention map is never materialised.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from adapters.sparse_dictionary.plan import GroupPlan


def apply_activation(coefficients: torch.Tensor, activation: str, threshold: float) -> torch.Tensor:
    """σ_λ for the threshold rules; ``topk`` is applied by ``keep_top_k`` since k varies per row."""
    if activation == "relu":
        return F.relu(coefficients - threshold)
    if activation == "soft_threshold":
        return torch.sign(coefficients) * F.relu(coefficients.abs() - threshold)
    return coefficients


def keep_top_k(coefficients: torch.Tensor, k_per_row: tuple[int, ...]) -> torch.Tensor:
    """Keep the k largest-magnitude coefficients of every token, k given per batch row.

    Magnitude, not value, so every token keeps exactly k non-zero coefficients (signed atoms
    can both add and remove a feature). The ks are plain ints, known when the batch is planned,
    so no per-call reduction or device sync is needed to pick k.
    """
    k_max = max(k_per_row)
    indices = coefficients.abs().topk(k_max, dim=-1, sorted=True).indices
    kept = coefficients.gather(-1, indices)
    if min(k_per_row) != k_max:
        ks = torch.tensor(k_per_row, device=coefficients.device)
        kept = kept * (torch.arange(k_max, device=coefficients.device) < ks.view(-1, 1, 1))
    return torch.zeros_like(coefficients).scatter_(-1, indices, kept)



def fused_output_weight(out_proj: nn.Linear, dictionary: torch.Tensor, num_heads: int) -> torch.Tensor:
    """``[W_outᵀ; D]`` with rows interleaved per head, (H·(d + M/H), C_out).

    The fused attention output holds, per head, its d channels of A·V then its M/H channels of
    A·S; with rows in that order, one product with this matrix gives to_out(A·V) + (A·S)·D
    and the two halves never need to be split out and copied.
    """
    out_features, in_features = out_proj.weight.shape
    base = out_proj.weight.detach().t().reshape(num_heads, in_features // num_heads, out_features)
    atoms = dictionary.detach().to(base.dtype).reshape(num_heads, -1, out_features)
    return torch.cat([base, atoms], dim=1).reshape(-1, out_features)



def compute_coefficients(hidden_states: torch.Tensor, groups: list[GroupPlan], num_heads: int) -> torch.Tensor:
    """scale·σ(X·W_s) per row, masked, laid out per head: (B, N, H, m), zero where unused.

    Per head, each group's M/H channels sit at its offset (composed adapters one after another);
    rows that use fewer channels than the widest row are zero-padded, which leaves their part of
    A·S exact.
    """
    batch, tokens, _ = hidden_states.shape
    per_head_max = max(g.offset + g.config.num_atoms // num_heads for g in groups)
    if len(groups) == 1 and groups[0].rows is None:
        return _group_coefficients(hidden_states, groups[0]).view(batch, tokens, num_heads, per_head_max)
    out = hidden_states.new_zeros(batch, tokens, num_heads, per_head_max)
    for group in groups:
        per_head = group.config.num_atoms // num_heads
        rows = hidden_states if group.rows is None else hidden_states[group.rows]
        coefficients = _group_coefficients(rows, group).view(rows.shape[0], tokens, num_heads, per_head)
        channels = slice(group.offset, group.offset + per_head)
        out[slice(None) if group.rows is None else group.rows, :, :, channels] = coefficients
    return out


def _group_coefficients(hidden_states: torch.Tensor, group: GroupPlan) -> torch.Tensor:
    weights = group.layer.coefficient_proj.to(hidden_states.dtype)
    coefficients = apply_activation(hidden_states @ weights, group.config.activation, group.config.threshold)
    if group.k_per_row is not None:
        coefficients = keep_top_k(coefficients, group.k_per_row)
    if group.keep is not None:
        coefficients = coefficients * group.keep.to(coefficients.dtype).unsqueeze(1)
    # A·(c·S)·D = c·(A·S·D): the scale rides on the coefficients, so A·S needs no second pass.
    if group.scales is not None:
        coefficients = coefficients * group.scales.to(coefficients.dtype).view(-1, 1, 1)
    return coefficients


def linear_with_slack(linear: nn.Linear, inputs: torch.Tensor, slack: int) -> torch.Tensor:
    """``linear(inputs)``, written into a buffer with ``slack`` spare elements after its end, so
    that ``fused_attention`` can read every head's query as a wider overlapping view."""
    rows = inputs.numel() // inputs.shape[-1]
    buffer = inputs.new_empty(rows * linear.out_features + slack)
    # The last head's view reads the slack; NaN bit patterns there would survive q·0 as NaN.
    buffer[rows * linear.out_features :] = 0
    output = buffer[: rows * linear.out_features].view(rows, linear.out_features)
    flat = inputs.reshape(rows, -1)
    if linear.bias is None:
        torch.mm(flat, linear.weight.t(), out=output)
    else:
        torch.addmm(linear.bias, flat, linear.weight.t(), out=output)
    return output.view(*inputs.shape[:-1], linear.out_features)


def fused_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    coefficients: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scale: float,
    query_has_slack: bool = False,
) -> torch.Tensor:
    """A·V and A·S from one SDPA call: S rides along V as extra value channels.

    Inputs are laid out (B, N, H, ·); the output is (B, N, H, d + M/H), per head A·V then A·S.
    Fused SDPA kernels want the value width to equal the query width, so k is padded with zero
    columns and the softmax scale is given explicitly. Zeros in k make q's extra columns
    irrelevant to q·kᵀ, so when q comes from ``linear_with_slack`` (``query_has_slack``: zeroed
    spare elements past its end) each head's query is read as an overlapping view that runs
    into the next head's values, and q is never copied.
    """
    head_dim = value.shape[-1]
    extra = coefficients.shape[-1]
    width = head_dim + extra
    padded_key = key.new_empty(*key.shape[:-1], width)
    padded_key[..., head_dim:] = 0
    padded_key[..., :head_dim] = key
    if query_has_slack:
        batch, tokens, heads, _ = query.shape
        wide_query = query.as_strided(
            (batch, tokens, heads, width), (tokens * heads * head_dim, heads * head_dim, head_dim, 1)
        )
    else:
        wide_query = F.pad(query, (0, extra))
    stacked = torch.cat([value, coefficients], dim=-1)
    return F.scaled_dot_product_attention(
        wide_query.transpose(1, 2),
        padded_key.transpose(1, 2),
        stacked.transpose(1, 2),
        attn_mask=attention_mask,
        scale=scale,
    ).transpose(1, 2)


def reference_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    coefficients: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scale: float,
) -> torch.Tensor:
    """The slow path with the attention map written out; the fused path is tested against it."""
    query, key, value, coefficients = (t.transpose(1, 2) for t in (query, key, value, coefficients))
    scores = (query @ key.transpose(-1, -2)) * scale
    if attention_mask is not None:
        scores = scores + attention_mask
    attention_map = scores.softmax(dim=-1)
    return torch.cat([attention_map @ value, attention_map @ coefficients], dim=-1).transpose(1, 2)


def project_fused(both: torch.Tensor, groups: list[GroupPlan], bias: torch.Tensor | None) -> torch.Tensor:
    """to_out(A·V) + (A·S)·D from the (B, N, H, d + M/H) attention output, one product per group."""
    batch, tokens = both.shape[:2]
    flat = both.reshape(batch, tokens, -1)
    if len(groups) == 1 and groups[0].rows is None:
        return _project(flat, groups[0].output_weight.weight, bias)  # type: ignore[union-attr]
    output = flat.new_empty(batch, tokens, groups[0].output_weight.weight.shape[1])  # type: ignore[union-attr]
    served = torch.zeros(batch, dtype=torch.bool, device=flat.device)
    for group in groups:
        rows = slice(None) if group.rows is None else group.rows
        output[rows] = _project(flat[rows], group.output_weight.weight, bias)  # type: ignore[union-attr]
        served[rows] = True
    # Rows no adapter serves have all-zero A·S channels, so any group's matrix projects them exactly.
    unserved = (~served).nonzero().squeeze(1)
    if unserved.numel():
        output[unserved] = _project(flat[unserved], groups[0].output_weight.weight, bias)  # type: ignore[union-attr]
    return output


def _stacked_dictionary(groups: list[GroupPlan], heads: int, dtype: torch.dtype) -> torch.Tensor:
    """The groups' D matrices with rows in A·S's channel order, per head each group's M/H atoms at
    its offset: (H·m, C_out). One group's D is that already."""
    if len(groups) == 1:
        return groups[0].layer.dictionary.to(dtype)
    ordered = sorted(groups, key=lambda group: group.offset)
    out_features = ordered[0].layer.dictionary.shape[1]
    per_head = [group.layer.dictionary.to(dtype).reshape(heads, -1, out_features) for group in ordered]
    return torch.cat(per_head, dim=1).reshape(-1, out_features)


def _project(rows: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    flat = rows.reshape(-1, weight.shape[0])
    projected = flat @ weight if bias is None else torch.addmm(bias, flat, weight)
    return projected.view(*rows.shape[:-1], weight.shape[1])


def add_dictionary_update(output: torch.Tensor, mixed: torch.Tensor, groups: list[GroupPlan]) -> torch.Tensor:
    """output + ΔO, ΔO = Σ (A·S)·D over the groups of each row; ``mixed`` is A·S laid out (B, N, H, m)."""
    batch, tokens, heads, _ = mixed.shape
    if all(group.rows is None for group in groups):
        # Every row has the same adapters at the same channels (one, or a composition): one product.
        dictionary = _stacked_dictionary(groups, heads, mixed.dtype)
        flat = torch.addmm(output.reshape(batch * tokens, -1), mixed.reshape(batch * tokens, -1), dictionary)
        return flat.view(output.shape)
    for group in groups:
        per_head = group.config.num_atoms // heads
        rows = mixed if group.rows is None else mixed[group.rows]
        rows = rows[..., group.offset : group.offset + per_head].reshape(rows.shape[0], tokens, -1)
        delta = rows @ group.layer.dictionary.to(mixed.dtype)
        if group.rows is None:
            output = output + delta
        elif isinstance(group.rows, slice):
            output[group.rows] += delta
        else:
            output.index_add_(0, group.rows, delta)
    return output
