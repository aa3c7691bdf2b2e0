"""Atom importance: how much each atom of each adapted block contributes to the learned update.

importance[block][j] = mean over probe tokens of |s_j| · ‖D_j‖, with s the coefficients after
σ (and top-k). A coefficient says how much a token uses atom j, ‖D_j‖ how large atom j's
contribution is per unit of use; their product is the atom's average share of ΔO's scale
before attention mixing. Probes are the training latents noised at evenly spaced timesteps,
so the ranking reflects the whole denoising trajectory.
"""

from __future__ import annotations

import torch
from diffusers import DDPMScheduler
from torch import nn

from adapters.sparse_dictionary import AdapterHost, SparseDictionaryAdapter


@torch.no_grad()
def compute_atom_importance(
    transformer: nn.Module,
    host: AdapterHost,
    adapter: SparseDictionaryAdapter,
    latents: torch.Tensor,
    prompt_embeds: torch.Tensor,
    prompt_attention_mask: torch.Tensor,
    probes: int,
    seed: int = 0,
) -> dict[int, torch.Tensor]:
    """Run the probes through ``transformer`` with the active route serving ``adapter``.

    The caller must be inside ``host.route(...)`` routing every row to ``adapter``.
    """
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    generator = torch.Generator().manual_seed(seed)
    usage = {block: torch.zeros(adapter.config.num_atoms, dtype=torch.float64) for block in adapter.blocks}
    counts = dict.fromkeys(adapter.blocks, 0)

    def observe(block: int, coefficients: torch.Tensor) -> None:
        flat = coefficients.detach().abs().reshape(-1, coefficients.shape[-1])[:, : adapter.config.num_atoms]
        usage[block] += flat.double().sum(dim=0).cpu()
        counts[block] += flat.shape[0]

    timesteps = torch.linspace(0, scheduler.config.num_train_timesteps - 1, probes).round().long()
    device = latents.device
    dtype = next(transformer.parameters()).dtype
    with host.add_observer(observe):
        for timestep in timesteps:
            batch = latents.shape[0]
            noise = torch.randn(latents.shape, generator=generator).to(device)
            noisy = scheduler.add_noise(latents, noise, timestep.repeat(batch))
            transformer(
                noisy.to(dtype),
                encoder_hidden_states=prompt_embeds.expand(batch, -1, -1),
                encoder_attention_mask=prompt_attention_mask.expand(batch, -1),
                timestep=timestep.repeat(batch).to(device),
                added_cond_kwargs={"resolution": None, "aspect_ratio": None},
            )

    importance = {}
    for block in adapter.blocks:
        atom_norms = adapter.layer(block).dictionary.detach().float().norm(dim=1).cpu()  # type: ignore[union-attr]
        mean_usage = (usage[block] / max(counts[block], 1)).float()
        importance[block] = mean_usage * atom_norms
    return importance
