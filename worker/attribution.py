"""Attribution maps: where in an image each of an adapter's most important atoms acts.

Atom j's contribution to a token's update is s_j·D_j, so its size there is |s_j|·‖D_j‖; the map
of atom j is that per image token, averaged over the denoising steps, for each adapted block.
The adapter's whole effect in a block is summed over every atom the same way (``total``). The
scheduler feeds each step's coefficients of a request's adapted rows to ``observe``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from adapters import SparseDictionaryAdapter


@dataclass
class AtomAttribution:
    """The running sums for one request: per block its K top atoms' maps and the total."""

    atoms: dict[int, torch.Tensor]
    """Per block, the K most important atoms' indices, most important first."""
    norms: dict[int, torch.Tensor]
    """Per block, ‖D_j‖ of every atom (M,)."""
    atoms_per_head: int
    sums: dict[int, torch.Tensor] = field(default_factory=dict)
    """Per block, (images, K, tokens): Σ over steps of |s_j|·‖D_j‖."""
    totals: dict[int, torch.Tensor] = field(default_factory=dict)
    """Per block, (images, tokens): Σ over steps and atoms of |s_j|·‖D_j‖."""
    passes: dict[int, int] = field(default_factory=dict)

    @classmethod
    def of(cls, adapter: SparseDictionaryAdapter, top: int, heads: int) -> AtomAttribution:
        atoms, norms = {}, {}
        for block in adapter.blocks:
            layer = adapter.layer(block)
            assert layer is not None
            scores = adapter.importance[block].float()
            atoms[block] = scores.topk(min(top, scores.numel())).indices.cpu()
            norms[block] = layer.dictionary.detach().float().norm(dim=1).cpu()
        return cls(atoms=atoms, norms=norms, atoms_per_head=adapter.config.num_atoms // heads)

    def observe(self, block: int, coefficients: torch.Tensor, heads: int) -> None:
        """One forward pass of ``block``: ``coefficients`` (rows, tokens, H·m) as the processor lays
        them out, per head this adapter's M/H channels first (it is the request's first adapter)."""
        if block not in self.atoms:
            return
        rows, tokens, _ = coefficients.shape
        own = coefficients.detach().float().view(rows, tokens, heads, -1)[..., : self.atoms_per_head]
        size = own.reshape(rows, tokens, -1).abs().cpu() * self.norms[block]  # (rows, tokens, M)
        top = size[..., self.atoms[block]].permute(0, 2, 1)  # (rows, K, tokens)
        if block in self.sums:
            self.sums[block] += top
            self.totals[block] += size.sum(-1)
        else:
            self.sums[block] = top.clone()
            self.totals[block] = size.sum(-1)
        self.passes[block] = self.passes.get(block, 0) + 1

    def result(self, grid: tuple[int, int]) -> dict[str, Any]:
        """The maps as JSON: per block, per image, a ``grid`` (rows, columns) of latent patches."""
        height, width = grid
        blocks = []
        for block in sorted(self.sums):
            mean = self.sums[block] / self.passes[block]
            total = self.totals[block] / self.passes[block]
            blocks.append(
                {
                    "block": block,
                    "total": total.view(-1, height, width).tolist(),
                    "atoms": [
                        {"atom": int(atom), "maps": mean[:, rank].reshape(-1, height, width).tolist()}
                        for rank, atom in enumerate(self.atoms[block].tolist())
                    ],
                }
            )
        return {"grid": [height, width], "blocks": blocks}
