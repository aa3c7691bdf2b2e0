"""Probes of the two concept bars the recipe misses (base preservation, copies), one change each.

Each probe trains ours (p = 0.04, M = 256, lr 3e-3) on the shipped example's six captioned images
with one change and scores it with `concept_eval.evaluate` (the full budget: 8 images per prompt,
20 steps, guidance 4.5, the adapter on the conditional half):

* which blocks carry the update (block 0's self-attention input holds no prompt: PixArt's block
  runs self-attention before cross-attention, so block 0 sees the noisy latent and the timestep
  only, and `--inputs` prints how far each block's input moves between prompts);
* prior preservation (on the training contexts with every base shape, or on ordinary prompts
  across the base world) and mirrored/shifted copies of the training images;
* the update on cross-attention instead (coefficients per *text* token, mixed by the
  cross-attention map: ΔO = A·σ(T·W_s)·D with T the caption's tokens), a reading the paper's
  parameter count fits as well as self-attention does. It lives here only, as a probe.

Beside Table 1's scores each row has the update's *reach*: how far it moves the noise prediction
for ordinary prompts over how far it moves it for the concept's (`update_reach`).

    python -m benchmarks.concept_probes --probes "all blocks,blocks 1-3" --seeds 0,1,2
    python -m benchmarks.concept_probes --inputs
    python -m benchmarks.concept_probes --report   # the recorded rows as a table

Results are appended to `benchmarks/results/concept_probes.json`, one row per probe and seed.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import PixArtSigmaPipeline
from diffusers.models.attention_processor import Attention, AttnProcessor2_0
from torch import nn

from adapters.tiny import TINY_MAX_SEQUENCE_LENGTH
from adapters.training import _fit, draw_prior, encode_concept
from benchmarks import concept_eval, world
from benchmarks import judge as judge_module
from benchmarks.train_demo_model import DEMO_MODEL, load_demo_model, quiet_progress_bars

RESULTS = Path(__file__).resolve().parent / "results" / "concept_probes.json"
TRAINING = concept_eval.TRAINING_SETS["varied"]


@dataclass(frozen=True)
class WidePrior(concept_eval.TrainingSet):
    """The shipped example, with prior prompts across the base world: every fourth (shape, colour,
    background) the demo model trained on, none of the preservation prompts among them."""

    def prior_prompts(self) -> tuple[str, ...]:
        scored = set(concept_eval.PRESERVATION)
        combos = [combo for combo in world.training_combinations() if combo not in scored]
        return tuple(world.caption(*combo) for combo in combos[::4])


@dataclass(frozen=True)
class Probe:
    method: concept_eval.Method
    steps: int
    cross_attention: bool = False
    training: concept_eval.TrainingSet = TRAINING
    branch: str = "conditional"
    """The guidance half the update acts on when sampling (``concept_eval.sample``)."""


def _ours(**changes: object) -> concept_eval.Method:
    return concept_eval.Method("ours p=0.04", "ours", **changes)  # type: ignore[arg-type]


PROBES: dict[str, Probe] = {
    "all blocks": Probe(_ours(), 1000),
    "block 0": Probe(_ours(target_blocks=(0,)), 1000),
    "blocks 1-3": Probe(_ours(target_blocks=(1, 2, 3)), 1000),
    "blocks 2-3": Probe(_ours(target_blocks=(2, 3)), 1000),
    "blocks 1-3 + prior": Probe(_ours(target_blocks=(1, 2, 3), prior_images_per_prompt=4), 1000),
    "blocks 1-3 + prior x3": Probe(
        _ours(target_blocks=(1, 2, 3), prior_images_per_prompt=4, prior_loss_weight=3.0), 1000
    ),
    "prior 3000 steps": Probe(_ours(prior_images_per_prompt=4), 3000),
    "wide prior 3000 steps": Probe(
        _ours(prior_images_per_prompt=2), 3000, training=WidePrior(TRAINING.contexts, TRAINING.per_context)
    ),
    "wide prior x3 3000 steps": Probe(
        _ours(prior_images_per_prompt=2, prior_loss_weight=3.0),
        3000,
        training=WidePrior(TRAINING.contexts, TRAINING.per_context),
    ),
    "wide prior x3 3000 steps on both halves": Probe(
        _ours(prior_images_per_prompt=2, prior_loss_weight=3.0),
        3000,
        training=WidePrior(TRAINING.contexts, TRAINING.per_context),
        branch="both",
    ),
    "wide prior x3 5000 steps on both halves": Probe(
        _ours(prior_images_per_prompt=2, prior_loss_weight=3.0),
        5000,
        training=WidePrior(TRAINING.contexts, TRAINING.per_context),
        branch="both",
    ),
    "wide prior x3 8000 steps on both halves": Probe(
        _ours(prior_images_per_prompt=2, prior_loss_weight=3.0),
        8000,
        training=WidePrior(TRAINING.contexts, TRAINING.per_context),
        branch="both",
    ),
    "1 augmented copy 2000 steps": Probe(_ours(augmentations=1), 2000),
    "2 augmented copies 2000 steps": Probe(_ours(augmentations=2), 2000),
    "2 augmented copies 4000 steps": Probe(_ours(augmentations=2), 4000),
    "1 copy shifted up to 1/4 2000 steps": Probe(_ours(augmentations=1, augmentation_shift=0.25), 2000),
    "1 copy shifted up to 1/4 3000 steps": Probe(_ours(augmentations=1, augmentation_shift=0.25), 3000),
    "1 copy shifted up to 3/16 2000 steps": Probe(_ours(augmentations=1, augmentation_shift=0.1875), 2000),
    "cross-attention": Probe(_ours(), 2000, cross_attention=True),
    "cross-attention + prior": Probe(_ours(prior_images_per_prompt=4), 2000, cross_attention=True),
}

assert not any("," in label for label in PROBES), "--probes takes a comma-separated list of labels"


class CrossAttentionDictionary(nn.Module):
    """Cross-attention plus A·σ_topk(T·W_s)·D, T the (projected) caption tokens."""

    def __init__(self, attn: Attention, method: concept_eval.Method, generator: torch.Generator, input_rms: float):
        super().__init__()
        c_in, c_out = attn.to_k.in_features, attn.to_out[0].out_features
        scale = 1.0 / (math.sqrt(c_in) * input_rms)
        self.coefficient_proj = nn.Parameter(torch.randn(c_in, method.num_atoms, generator=generator) * scale)
        self.dictionary = nn.Parameter(torch.zeros(method.num_atoms, c_out))
        self.active_atoms = max(1, round(method.density * method.num_atoms))
        self.active = False
        self.plain = AttnProcessor2_0()

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
    ) -> torch.Tensor:
        output = self.plain(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        if not self.active or encoder_hidden_states is None:
            return output
        batch, tokens, _ = hidden_states.shape
        heads, text = attn.heads, encoder_hidden_states.shape[1]
        query = attn.to_q(hidden_states).view(batch, tokens, heads, -1).transpose(1, 2)
        key = attn.to_k(encoder_hidden_states).view(batch, text, heads, -1).transpose(1, 2)
        scores = encoder_hidden_states @ self.coefficient_proj
        top = scores.topk(self.active_atoms, dim=-1)
        coefficients = torch.zeros_like(scores).scatter(-1, top.indices, top.values)
        coefficients = coefficients.view(batch, text, heads, -1).transpose(1, 2)
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, text, batch).view(batch, heads, -1, text)
        mixed = F.scaled_dot_product_attention(query, key, coefficients, attn_mask=attention_mask, scale=attn.scale)
        return output + mixed.transpose(1, 2).reshape(batch, tokens, -1) @ self.dictionary


def _cross_attention_tuned(probe: Probe, recipe: concept_eval.Recipe, seed: int) -> concept_eval.Tuned:
    pipe = load_demo_model(DEMO_MODEL)
    transformer = pipe.transformer
    method = probe.method
    config = concept_eval.training_config(method, recipe, seed, concept_eval.FULL, probe.training)
    embeds, mask, _, _ = pipe.encode_prompt(
        TRAINING.prompts(),
        do_classifier_free_guidance=False,
        device="cpu",
        clean_caption=False,
        max_sequence_length=TINY_MAX_SEQUENCE_LENGTH,
    )
    with torch.no_grad():
        input_rms = float(transformer.caption_projection(embeds)[mask.bool()].pow(2).mean().sqrt())
    generator = torch.Generator().manual_seed(seed)
    processors: dict[str, object] = {}
    updates: list[CrossAttentionDictionary] = []
    for name in transformer.attn_processors:
        if ".attn2." in name:
            block = transformer.transformer_blocks[int(name.split(".")[1])]
            updates.append(CrossAttentionDictionary(block.attn2, method, generator, input_rms))
            processors[name] = updates[-1]
        else:
            processors[name] = AttnProcessor2_0()
    transformer.set_attn_processor(processors)

    @contextmanager
    def switched(active: bool):  # type: ignore[no-untyped-def]
        for update in updates:
            update.active = active
        yield

    started = time.perf_counter()
    prior = draw_prior(pipe, config, seed)
    data = encode_concept(pipe, TRAINING.images(), TRAINING.captions(), config, torch.Generator().manual_seed(seed))
    parameters = [p for update in updates for p in (update.coefficient_proj, update.dictionary)]
    with switched(True):
        _fit(pipe, parameters, data, config, torch.Generator().manual_seed(seed), None, None, prior)
    return concept_eval.Tuned(
        pipe,
        on=lambda: switched(True),
        off=lambda: switched(False),
        trainable_parameters=sum(p.numel() for p in parameters),
        train_seconds=time.perf_counter() - started,
    )


def run_probe(label: str, seed: int, judge: judge_module.Judge) -> dict[str, object]:
    probe = PROBES[label]
    recipe = concept_eval.Recipe(3e-3, probe.steps)
    if probe.cross_attention:
        tuned = _cross_attention_tuned(probe, recipe, seed)
        scores, _ = concept_eval.evaluate(tuned, judge, seed, concept_eval.FULL, probe.branch, TRAINING)
        seconds = tuned.train_seconds
    else:
        run, tuned, _ = concept_eval.run_method(
            probe.method, seed, concept_eval.FULL, DEMO_MODEL, judge, probe.branch, probe.training, recipe
        )
        scores, seconds = run.scores, run.train_seconds
    return {
        "probe": label,
        "seed": seed,
        "steps": probe.steps,
        "train_seconds": round(seconds, 1),
        "update_reach": update_reach(tuned, seed),
        **vars(scores),
    }


@torch.no_grad()
def update_reach(tuned: concept_eval.Tuned, seed: int) -> float:
    """How far the update moves the conditional noise prediction for the ordinary (preservation)
    prompts, over how far it moves it for the concept's training prompts: RMS over the same 24
    noisy latents at timesteps 900, 500 and 100. Near 1: the update cannot tell them apart."""
    pipe = tuned.pipe
    rows = 24
    side = concept_eval.RESOLUTION // pipe.vae_scale_factor
    shape = (rows, pipe.transformer.config.in_channels, side, side)
    latents = torch.randn(shape, generator=torch.Generator().manual_seed(seed))

    def moved(prompts: list[str]) -> float:
        embeds, mask, _, _ = pipe.encode_prompt(
            prompts * (rows // len(prompts)),
            do_classifier_free_guidance=False,
            clean_caption=False,
            max_sequence_length=TINY_MAX_SEQUENCE_LENGTH,
        )
        squares = []
        for timestep in (900, 500, 100):
            predictions = []
            for switch in (tuned.on, tuned.off):
                with switch():
                    predictions.append(
                        pipe.transformer(
                            latents,
                            encoder_hidden_states=embeds,
                            encoder_attention_mask=mask,
                            timestep=torch.full((rows,), timestep),
                            added_cond_kwargs={"resolution": None, "aspect_ratio": None},
                        ).sample.chunk(2, dim=1)[0]
                    )
            squares.append(float((predictions[0] - predictions[1]).pow(2).mean()))
        return math.sqrt(sum(squares) / len(squares))

    ordinary = [world.caption(*combo) for combo in concept_eval.PRESERVATION]
    return moved(ordinary) / moved(TRAINING.prompts())


@torch.no_grad()
def block_input_changes() -> list[dict[str, object]]:
    """Per block and timestep, how far the self-attention input moves when the prompt changes
    from the concept's to an ordinary one (relative L2, one shared noisy latent), and the share of
    the image tokens' cross-attention that goes to the shape word (``sks``, ``circle``, ``square``)."""
    pipe: PixArtSigmaPipeline = load_demo_model(DEMO_MODEL)
    transformer = pipe.transformer
    inputs: dict[int, torch.Tensor] = {}
    shares: dict[int, list[float]] = {}
    prompts = [world.caption(*combo) for combo in (("sks", "red", "black"), ("circle", "red", "black"))]
    prompts.append(world.caption("square", "blue", "white"))
    # "a <colour> <shape> on a ...": the shape word is the third token of each prompt.
    words = [pipe.tokenizer.tokenize(prompt)[2] for prompt in prompts]
    assert words == ["▁sks", "▁circle", "▁square"], words

    def cross_attention_share(
        attn: Attention, hidden: torch.Tensor, text: torch.Tensor, mask: torch.Tensor
    ) -> list[float]:
        batch, tokens, _ = hidden.shape
        query = attn.to_q(hidden).view(batch, tokens, attn.heads, -1).transpose(1, 2)
        key = attn.to_k(text).view(batch, text.shape[1], attn.heads, -1).transpose(1, 2)
        weights = torch.softmax(query @ key.transpose(-1, -2) * attn.scale + mask[:, None], dim=-1)
        return [float(share) for share in weights[..., 2].mean(dim=(1, 2))]

    for index, block in enumerate(transformer.transformer_blocks):
        block.attn1.register_forward_pre_hook(lambda _, args, i=index: inputs.__setitem__(i, args[0]))
        block.attn2.register_forward_pre_hook(
            lambda attn, args, kwargs, i=index: shares.__setitem__(
                i, cross_attention_share(attn, args[0], kwargs["encoder_hidden_states"], kwargs["attention_mask"])
            ),
            with_kwargs=True,
        )
    embeds, mask, _, _ = pipe.encode_prompt(
        prompts, do_classifier_free_guidance=False, clean_caption=False, max_sequence_length=TINY_MAX_SEQUENCE_LENGTH
    )
    side = concept_eval.RESOLUTION // pipe.vae_scale_factor
    latent = torch.randn(1, transformer.config.in_channels, side, side, generator=torch.Generator().manual_seed(0))
    rows = []
    for timestep in (900, 500, 100):
        transformer(
            latent.expand(len(prompts), -1, -1, -1),
            encoder_hidden_states=embeds,
            encoder_attention_mask=mask,
            timestep=torch.full((len(prompts),), timestep),
            added_cond_kwargs={"resolution": None, "aspect_ratio": None},
        )
        for block, block_input in sorted(inputs.items()):
            change = [float((block_input[0] - block_input[i]).norm() / block_input[0].norm()) for i in (1, 2)]
            rows.append(
                {
                    "timestep": timestep,
                    "block": block,
                    "sks_vs_circle": change[0],
                    "sks_vs_square": change[1],
                    "shape_word_attention": dict(zip(("sks", "circle", "square"), shares[block], strict=True)),
                }
            )
    return rows


def report(rows: list[dict[str, object]]) -> str:
    """A markdown table of the recorded rows: per probe, the mean over its seeds."""
    columns = {
        "training_fidelity": "training prompt",
        "recontext_fidelity": "held out",
        "recontext_colour": "colour honoured",
        "recontext_background": "background honoured",
        "preservation": "preservation",
        "copy_ratio": "copy ratio",
        "update_reach": "update reach",
        "train_seconds": "fine-tune s",
    }
    lines = ["| probe | seeds | " + " | ".join(columns.values()) + " |", "|---" * (len(columns) + 2) + "|"]
    for label in dict.fromkeys(str(row["probe"]) for row in rows):
        mine = [row for row in rows if row["probe"] == label]
        cells = []
        for key in columns:
            values = [float(row[key]) for row in mine if row.get(key) is not None]  # type: ignore[arg-type]
            mean = sum(values) / len(values) if values else None
            cells.append("n/a" if mean is None else f"{mean:.0f}" if key == "train_seconds" else f"{mean:.3f}")
        lines.append(f"| {label} | {len(mine)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--probes", default=",".join(PROBES), help=f"comma-separated, of: {', '.join(PROBES)}")
    parser.add_argument("--seeds", default="0", help="comma-separated training seeds")
    parser.add_argument("--inputs", action="store_true", help="only print how each block's input moves with the prompt")
    parser.add_argument("--report", action="store_true", help="only print the recorded rows as a table")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    quiet_progress_bars()
    if args.report:
        print(report(json.loads(RESULTS.read_text())))
        return
    if args.inputs:
        for row in block_input_changes():
            print(json.dumps(row))
        return
    labels = args.probes.split(",")
    if unknown := sorted(set(labels) - set(PROBES)):
        parser.error(f"unknown probes {unknown}")
    judge = judge_module.load_judge()
    rows = json.loads(RESULTS.read_text()) if RESULTS.exists() else []
    for label in labels:
        for seed in (int(s) for s in args.seeds.split(",")):
            row = {**run_probe(label, seed, judge), "machine": concept_eval.machine(), "command": " ".join(sys.argv)}
            print(json.dumps(row), flush=True)
            rows.append(row)
            RESULTS.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
