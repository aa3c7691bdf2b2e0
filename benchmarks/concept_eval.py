"""Concept customisation on the demo model: does a tenant's fine-tune yield their concept?

The concept is a striped heart (`world.CONCEPT`), a shape and texture the demo model never saw,
learned as "sks" from six renders, two in each of three contexts, each captioned with its context
("a red sks on a black background", "a blue sks on a white background", ...), as the shipped
example `examples/striped-heart/` is (`--training single`: five renders of one context, all on
one prompt). Every method is then asked for it, and the judge (`benchmarks/judge.py`) scores what
it draws:

* training-prompt fidelity: the judge's mean probability of the concept class on the training
  captions themselves (the paper's CLIP-I to the concept images);
* recontextualisation: the same on held-out colour/background pairs named in the prompt (a new
  colour *and* a new background each), with the share of images whose colour and background the
  judge finds as prompted (the paper's CLIP-T);
* base preservation: judged accuracy (shape, colour, background) on ordinary prompts without the
  concept token, with the adapter applied against without it;
* diversity: the Vendi score of the judge's embeddings over the images of one prompt;
* copies: each training-prompt image's distance to its nearest training image over the training
  images' own nearest-neighbour distance (pixels); below 1 means closer than the training images
  are to each other;
* fine-tune seconds and trainable parameters.

Every fidelity stands beside its ceiling: the VAE round trip of the concept's own renders for the
same colour and background (no diffusion), the most any method could score through this VAE.
Adapters act on the conditional half of the guidance batch (`adapter_guidance`, the service's
default); `--branch both` measures the other choice. Each method runs at its own best recipe
from `--sweep` (learning rate x steps).

    python -m benchmarks.concept_eval              # Table 1, Table 2, Figures 3, 4 and 7 (about 20 min)
    python -m benchmarks.concept_eval --sweep      # each method's recipe: learning rate x steps
    python -m benchmarks.concept_eval --quick      # a minute: one seed, a few steps, small sweeps

Outputs land in `benchmarks/results/` (`--output` to change): `concept_eval.md` (tables),
`concept_eval.json` (every number) and image grids.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from diffusers import PixArtSigmaPipeline
from PIL import Image

from adapters import (
    AdapterHost,
    SampleRoute,
    SparseDictionaryConfig,
    TrainingConfig,
    train_adapter,
    train_baseline,
)
from adapters.tiny import TINY_MAX_SEQUENCE_LENGTH
from benchmarks import judge as judge_module
from benchmarks import world
from benchmarks.train_demo_model import (
    DEMO_MODEL,
    GUIDANCE_SCALE,
    RESOLUTION,
    RESULTS,
    load_demo_model,
    quiet_progress_bars,
)

Pair = tuple[str, str]


@dataclass(frozen=True)
class TrainingSet:
    """The concept's training images: ``per_context`` renders in each (colour, background)."""

    contexts: tuple[Pair, ...]
    per_context: int

    def images(self, seed: int = 0) -> list[Image.Image]:
        return [
            image for i, pair in enumerate(self.contexts) for image in concept_images(seed + i, self.per_context, pair)
        ]

    def captions(self) -> list[str]:
        return [caption for caption in self.prompts() for _ in range(self.per_context)]

    def prompts(self) -> list[str]:
        return [world.caption(world.CONCEPT_TOKEN, *pair) for pair in self.contexts]

    def prior_prompts(self) -> tuple[str, ...]:
        """DreamBooth's class prompts: the training contexts, each with every shape the base knows."""
        return tuple(world.caption(shape, *pair) for pair in self.contexts for shape in world.SHAPES)


TRAINING_SETS = {
    # The concept in varied contexts, each image captioned with its own: what examples/ ships.
    "varied": TrainingSet((("red", "black"), ("blue", "white"), ("yellow", "pink")), per_context=2),
    "single": TrainingSet((("red", "black"),), per_context=5),
}
# Combinations no training image shows; all survive the VAE round trip (their ceilings are reported).
HELD_OUT_PAIRS: tuple[Pair, ...] = (
    ("blue", "pink"),
    ("yellow", "grey"),
    ("purple", "white"),
    ("orange", "pink"),
)
# Ordinary prompts without the concept token, for base preservation: every shape, mixed contexts.
PRESERVATION: tuple[tuple[str, str, str], ...] = (
    ("circle", "blue", "pink"),
    ("square", "yellow", "grey"),
    ("triangle", "purple", "white"),
    ("star", "orange", "black"),
    ("cross", "red", "white"),
    ("circle", "green", "black"),
    ("square", "red", "black"),
    ("triangle", "blue", "grey"),
)
ADAPTER = "concept"
T_975 = {1: 12.71, 2: 4.30, 3: 3.18, 4: 2.78, 5: 2.57}
"""Student's t quantiles (0.975) by degrees of freedom, for 95 % intervals over seeds."""


@dataclass(frozen=True)
class Method:
    label: str
    kind: str
    """"ours", a PEFT baseline ("lora", "dora", "oft") or "base" (no fine-tuning)."""
    density: float = 0.04
    num_atoms: int = 256
    activation: str = "topk"
    threshold: float = 0.0
    rank: int | None = None
    """LoRA rank when it differs from the paper's 16 (Figure 4's rank-1 LoRA)."""
    augmentations: int = 0
    """Mirrored and shifted copies of every training image (``TrainingConfig.augmentations``)."""
    augmentation_shift: float = 0.125
    prior_images_per_prompt: int = 0
    """Base images drawn per prior prompt for prior preservation (0: none); the prior prompts are
    the training contexts with every base shape in place of the concept (``prior_prompts``)."""
    prior_loss_weight: float = 1.0
    target_blocks: tuple[int, ...] | None = None
    """Ours only: the blocks whose self-attention gets the adapter (``None``: every block)."""

    @property
    def plain(self) -> bool:
        """Trained on the concept's images alone, on every block, as the service trains."""
        return self.augmentations == 0 and self.prior_images_per_prompt == 0 and self.target_blocks is None


@dataclass(frozen=True)
class Recipe:
    learning_rate: float
    steps: int


# Each method's best recipe from `--sweep` on this model (benchmarks/RESULTS.md has the sweep).
RECIPES: dict[str, Recipe] = {
    "ours": Recipe(3e-3, 1000),
    "lora": Recipe(3e-3, 2000),
    "dora": Recipe(3e-3, 2000),
    "oft": Recipe(1e-3, 2000),
}


@dataclass(frozen=True)
class Budget:
    seeds: tuple[int, ...]
    batch_size: int
    images_per_prompt: int
    inference_steps: int
    held_out_pairs: int
    steps_scale: float
    """Multiplies every recipe's steps (the quick budget trains a few steps only)."""
    densities: tuple[float, ...]
    atom_counts: tuple[int, ...]
    top_atoms: tuple[int, ...]
    sweep_learning_rates: tuple[float, ...]
    sweep_steps: tuple[int, ...]


FULL = Budget(
    seeds=(0, 1, 2),
    batch_size=4,
    images_per_prompt=8,
    inference_steps=20,
    held_out_pairs=len(HELD_OUT_PAIRS),
    steps_scale=1.0,
    densities=(0.01, 0.02, 0.04, 0.08, 0.16, 0.32),
    atom_counts=(16, 64, 256, 1024),
    top_atoms=(1, 2, 4, 8, 16, 40, 64),
    sweep_learning_rates=(1e-4, 1e-3, 3e-3),
    sweep_steps=(1000, 2000),
)
QUICK = Budget(
    seeds=(0,),
    batch_size=2,
    images_per_prompt=2,
    inference_steps=6,
    held_out_pairs=2,
    steps_scale=0.02,
    densities=(0.02, 0.08),
    atom_counts=(16, 256),
    top_atoms=(4,),
    sweep_learning_rates=(3e-3,),
    sweep_steps=(20,),
)

METHODS: tuple[Method, ...] = (
    Method("base model (no tuning)", "base"),
    Method("ours p=0.02", "ours", density=0.02),
    Method("ours p=0.04", "ours", density=0.04),
    Method("LoRA r=16", "lora"),
    Method("DoRA r=16", "dora"),
    Method("OFT r=4", "oft"),
    # What the two bars the plain recipe misses (no copies, base preservation) cost it, measured.
    Method("ours p=0.04, 4 augmented copies", "ours", augmentations=4),
    Method("ours p=0.04, prior preservation", "ours", prior_images_per_prompt=4),
)
# The method each sweep row trains: ours at the API's default density.
SWEPT = ("ours p=0.04", "LoRA r=16", "DoRA r=16", "OFT r=4")


# -- the concept and its ceilings -------------------------------------------------------------


def concept_images(seed: int, count: int, pair: Pair) -> list[Image.Image]:
    """Renders of the concept in one colour on one background, varied position, size and tilt."""
    combos = [(world.CONCEPT, *pair)]
    return [world.render(scene, RESOLUTION) for scene in world.scenes(seed, count, combos)]


@torch.no_grad()
def vae_ceiling(pipe: PixArtSigmaPipeline, judge: judge_module.Judge, pair: tuple[str, str], count: int = 16) -> float:
    """The judge's concept probability on the VAE round trip of the concept's own renders."""
    images = concept_images(seed=4242, count=count, pair=pair)
    pixels = torch.from_numpy(world.to_array(images))
    decoded = pipe.vae.decode(pipe.vae.encode(pixels).latent_dist.mean).sample
    round_trip = pipe.image_processor.postprocess(decoded, output_type="pil")
    return concept_probability(judge_module.judge_images(judge, round_trip))


def concept_probability(verdict: judge_module.Verdict) -> float:
    """Mean judge probability of the concept class: continuous, like the paper's CLIP-I."""
    return float(verdict.probabilities["shape"][:, world.JUDGE_SHAPES.index(world.CONCEPT)].mean())


# -- a fine-tuned model and how to sample it ----------------------------------------------------


@dataclass
class Tuned:
    """A pipeline with one method's update, and how to switch that update on and off per forward
    pass, so that it can act on one half of the guidance batch only."""

    pipe: PixArtSigmaPipeline
    on: Callable[[], AbstractContextManager[object]]
    off: Callable[[], AbstractContextManager[object]]
    trainable_parameters: int = 0
    train_seconds: float = 0.0
    host: AdapterHost | None = None

    def with_route(self, route: SampleRoute) -> Tuned:
        """Ours only: the same adapter with another route (density, top atoms)."""
        assert self.host is not None
        host = self.host
        return replace(self, on=lambda: host.route([route]))


@torch.no_grad()
def sample(
    tuned: Tuned,
    prompts: Sequence[str],
    seed: int,
    steps: int,
    branch: str = "conditional",
    guidance: float = GUIDANCE_SCALE,
) -> list[Image.Image]:
    """The PixArt-Σ pipeline's sampling loop, with the update on the guidance half ``branch`` asks
    for (two forward passes per step instead of one doubled batch, so any method can do it)."""
    images: list[Image.Image] = []
    for start in range(0, len(prompts), 16):
        chunk = list(prompts[start : start + 16])
        images += _sample_chunk(tuned, chunk, 10_000 * seed + start, steps, branch, guidance)
    return images


def _sample_chunk(
    tuned: Tuned, prompts: list[str], seed: int, steps: int, branch: str, guidance: float
) -> list[Image.Image]:
    pipe = tuned.pipe
    cond, cond_mask, uncond, uncond_mask = pipe.encode_prompt(
        prompts,
        do_classifier_free_guidance=True,
        negative_prompt="",
        device=pipe.transformer.device,
        clean_caption=False,
        max_sequence_length=TINY_MAX_SEQUENCE_LENGTH,
    )
    side = RESOLUTION // pipe.vae_scale_factor
    channels = pipe.transformer.config.in_channels
    scheduler = copy.deepcopy(pipe.scheduler)
    scheduler.set_timesteps(steps)
    generator = torch.Generator().manual_seed(seed)
    latents = torch.randn((len(prompts), channels, side, side), generator=generator) * scheduler.init_noise_sigma

    def predict(
        x: torch.Tensor, t: torch.Tensor, embeds: torch.Tensor, mask: torch.Tensor, adapted: bool
    ) -> torch.Tensor:
        with tuned.on() if adapted else tuned.off():
            out = pipe.transformer(
                x,
                encoder_hidden_states=embeds,
                encoder_attention_mask=mask,
                timestep=t.expand(x.shape[0]),
                added_cond_kwargs={"resolution": None, "aspect_ratio": None},
            ).sample
        return out.chunk(2, dim=1)[0]

    for t in scheduler.timesteps:
        x = scheduler.scale_model_input(latents, t)
        eps_uncond = predict(x, t, uncond, uncond_mask, branch in ("unconditional", "both"))
        eps_cond = predict(x, t, cond, cond_mask, branch in ("conditional", "both"))
        latents = scheduler.step(eps_uncond + guidance * (eps_cond - eps_uncond), t, latents).prev_sample
    decoded = pipe.vae.decode(latents / pipe.vae.config.scaling_factor).sample
    return pipe.image_processor.postprocess(decoded, output_type="pil")


def training_config(method: Method, recipe: Recipe, seed: int, budget: Budget, training: TrainingSet) -> TrainingConfig:
    """The engine's training settings for ``method`` at ``recipe`` under ``budget``."""
    return TrainingConfig(
        steps=max(1, round(recipe.steps * budget.steps_scale)),
        learning_rate=recipe.learning_rate,
        augmentations=method.augmentations,
        augmentation_shift=method.augmentation_shift,
        prior_prompts=training.prior_prompts() if method.prior_images_per_prompt else (),
        prior_images_per_prompt=max(method.prior_images_per_prompt, 1),
        prior_loss_weight=method.prior_loss_weight,
        batch_size=budget.batch_size,
        seed=seed,
        max_sequence_length=TINY_MAX_SEQUENCE_LENGTH,
    )


def fine_tune(method: Method, recipe: Recipe, seed: int, budget: Budget, model: Path, training: TrainingSet) -> Tuned:
    """Loads a fresh base (PEFT wraps it in place) and trains ``method`` on the concept."""
    pipe = load_demo_model(model)
    config = training_config(method, recipe, seed, budget, training)
    images, captions = training.images(), training.captions()
    started = time.perf_counter()
    if method.kind == "base":
        return Tuned(pipe, on=nullcontext, off=nullcontext)
    if method.kind == "ours":
        host = AdapterHost(pipe.transformer)
        adapter_config = SparseDictionaryConfig(
            num_atoms=method.num_atoms,
            density=method.density,
            activation=method.activation,
            threshold=method.threshold,
            target_blocks=None if method.target_blocks is None else list(method.target_blocks),
        )
        result = train_adapter(pipe, host, images, captions, adapter_config, config)
        host.add(ADAPTER, result.adapter)
        parameters = sum(p.numel() for p in result.adapter.parameters())
        return Tuned(
            pipe,
            on=lambda: host.route([SampleRoute(ADAPTER)]),
            off=nullcontext,
            trainable_parameters=parameters,
            train_seconds=time.perf_counter() - started,
            host=host,
        )
    if method.rank is not None:
        model_ = _train_low_rank(pipe, images, captions, method.rank, config)
    else:
        model_ = train_baseline(pipe, images, captions, method.kind, config).model  # type: ignore[arg-type]
    parameters = sum(p.numel() for name, p in model_.named_parameters() if any(t in name for t in ("lora_", "oft_")))
    return Tuned(
        pipe,
        on=nullcontext,
        off=model_.disable_adapter,  # type: ignore[operator]
        trainable_parameters=parameters,
        train_seconds=time.perf_counter() - started,
    )


def _train_low_rank(
    pipe: PixArtSigmaPipeline, images: list[Image.Image], captions: list[str], rank: int, config: TrainingConfig
) -> torch.nn.Module:
    """LoRA of another rank through the same loop (Figure 4 compares rank 1 with one atom)."""
    from peft import LoraConfig, get_peft_model

    from adapters.training import PEFT_TARGET_MODULES, _fit, encode_concept

    torch.manual_seed(config.seed)
    model = get_peft_model(pipe.transformer, LoraConfig(r=rank, lora_alpha=rank, target_modules=PEFT_TARGET_MODULES))
    generator = torch.Generator().manual_seed(config.seed)
    data = encode_concept(pipe, images, captions, config, generator)
    _fit(pipe, [p for p in model.parameters() if p.requires_grad], data, config, generator, None, None)
    return model


# -- scores -------------------------------------------------------------------------------------


@dataclass
class Scores:
    training_fidelity: float
    recontext_fidelity: float
    recontext_colour: float
    recontext_background: float
    preservation: float
    """Judged accuracy on the ordinary prompts (mean of shape, colour and background)."""
    diversity: float
    copy_ratio: float
    per_pair: dict[str, float] = field(default_factory=dict)


def evaluate(
    tuned: Tuned, judge: judge_module.Judge, seed: int, budget: Budget, branch: str, training_set: TrainingSet
) -> tuple[Scores, dict[str, list[Image.Image]]]:
    per = budget.images_per_prompt
    steps = budget.inference_steps
    pairs = HELD_OUT_PAIRS[: budget.held_out_pairs]
    training = sample(tuned, [prompt for prompt in training_set.prompts() for _ in range(per)], seed, steps, branch)
    held_out_prompts = [world.caption(world.CONCEPT_TOKEN, *pair) for pair in pairs for _ in range(per)]
    held_out = sample(tuned, held_out_prompts, seed + 1, steps, branch)
    ordinary_prompts = [world.caption(*combo) for combo in PRESERVATION for _ in range(per)]
    ordinary = sample(tuned, ordinary_prompts, seed + 2, steps, branch)

    trained = judge_module.judge_images(judge, training)
    verdict = judge_module.judge_images(judge, held_out)
    concept = verdict.probabilities["shape"][:, world.JUDGE_SHAPES.index(world.CONCEPT)]
    wanted = [pair for pair in pairs for _ in range(per)]
    colour = np.mean([label == want[0] for label, want in zip(verdict.labels["colour"], wanted, strict=True)])
    background = np.mean([label == want[1] for label, want in zip(verdict.labels["background"], wanted, strict=True)])
    embeddings = verdict.embeddings.reshape(len(pairs), per, -1)
    return (
        Scores(
            training_fidelity=concept_probability(trained),
            recontext_fidelity=float(concept.mean()),
            recontext_colour=float(colour),
            recontext_background=float(background),
            preservation=preservation_accuracy(judge, ordinary, per),
            diversity=float(np.mean([judge_module.vendi_score(group) for group in embeddings])),
            copy_ratio=copy_ratio(training, training_set.images()),
            per_pair={f"{c}/{b}": float(concept[i * per : (i + 1) * per].mean()) for i, (c, b) in enumerate(pairs)},
        ),
        {"training prompt": training, "held-out pairs": held_out, "ordinary prompts": ordinary},
    )


def preservation_accuracy(judge: judge_module.Judge, images: list[Image.Image], per: int) -> float:
    verdict = judge_module.judge_images(judge, images)
    truth = [combo for combo in PRESERVATION for _ in range(per)]
    hits = [
        np.mean(
            [
                verdict.labels[name][i] == want
                for name, want in zip(("shape", "colour", "background"), combo, strict=True)
            ]
        )
        for i, combo in enumerate(truth)
    ]
    return float(np.mean(hits))


def copy_ratio(generated: list[Image.Image], training: list[Image.Image]) -> float:
    """Median distance from a generated image to its nearest training image, over the median
    distance from a training image to its nearest other one (pixels, 32 px, RGB)."""

    def pixels(images: list[Image.Image]) -> np.ndarray:
        return world.to_array([image.resize((32, 32), Image.Resampling.BOX) for image in images]).reshape(
            len(images), -1
        )

    gen, train = pixels(generated), pixels(training)
    to_train = np.sqrt(((gen[:, None] - train[None]) ** 2).sum(-1)).min(1)
    among = np.sqrt(((train[:, None] - train[None]) ** 2).sum(-1))
    np.fill_diagonal(among, np.inf)
    return float(np.median(to_train) / np.median(among.min(1)))


def interval(values: Sequence[float]) -> tuple[float, float]:
    """Mean and the half-width of its 95 % interval over seeds (0 for a single value)."""
    array = np.asarray(values, dtype=float)
    if len(array) < 2:
        return float(array.mean()), 0.0
    return float(array.mean()), float(T_975[len(array) - 1] * array.std(ddof=1) / np.sqrt(len(array)))


# -- runs ---------------------------------------------------------------------------------------


@dataclass
class Run:
    method: Method
    recipe: Recipe
    seed: int
    scores: Scores
    trainable_parameters: int
    train_seconds: float
    extra: dict[str, object] = field(default_factory=dict)


def run_method(
    method: Method,
    seed: int,
    budget: Budget,
    model: Path,
    judge: judge_module.Judge,
    branch: str,
    training: TrainingSet,
    recipe: Recipe | None = None,
) -> tuple[Run, Tuned, dict[str, list[Image.Image]]]:
    recipe = recipe or RECIPES.get(method.kind, Recipe(0.0, 0))
    tuned = fine_tune(method, recipe, seed, budget, model, training)
    scores, images = evaluate(tuned, judge, seed, budget, branch, training)
    return Run(method, recipe, seed, scores, tuned.trainable_parameters, tuned.train_seconds), tuned, images


def _log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def run_sweep(budget: Budget, model: Path, output: Path, branch: str, training: TrainingSet) -> dict[str, object]:
    """Each method's recipe: training-prompt and held-out fidelity over learning rate x steps."""
    judge = judge_module.load_judge()
    rows = []
    for label in SWEPT:
        method = next(m for m in METHODS if m.label == label)
        kind = method.kind
        for lr in budget.sweep_learning_rates:
            for steps in budget.sweep_steps:
                # Half the images per prompt of the full benchmark: the sweep only ranks recipes.
                probe = replace(budget, steps_scale=1.0, images_per_prompt=max(budget.images_per_prompt // 2, 2))
                run, _, _ = run_method(method, 0, probe, model, judge, branch, training, Recipe(lr, steps))
                rows.append(_run_dict(run))
                _log(f"sweep {kind} lr={lr} steps={steps}: {run.scores}")
    lines = [
        "| method | learning rate | steps | training fidelity | held-out fidelity | colour | background "
        "| preservation | seconds |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        s = row["scores"]
        lines.append(
            f"| {row['method']['kind']} | {row['recipe']['learning_rate']:g} | {row['recipe']['steps']} "
            f"| {s['training_fidelity']:.3f} | {s['recontext_fidelity']:.3f} | {s['recontext_colour']:.2f} "
            f"| {s['recontext_background']:.2f} | {s['preservation']:.3f} | {row['train_seconds']:.0f} |"
        )
    raw = {
        "machine": machine(),
        "command": " ".join(sys.argv),
        "branch": branch,
        "sweep": rows,
        "best": {kind: asdict(recipe) for kind, recipe in best_recipes(rows).items()},
    }
    output.mkdir(parents=True, exist_ok=True)
    (output / "concept_sweep.md").write_text("\n".join(lines) + "\n")
    (output / "concept_sweep.json").write_text(json.dumps(raw, indent=2) + "\n")
    print("\n".join(lines))
    return raw


def best_recipes(rows: list[dict[str, object]]) -> dict[str, Recipe]:
    """Per method, the swept recipe with the highest mean of training-prompt and held-out fidelity."""
    best: dict[str, tuple[float, Recipe]] = {}
    for row in rows:
        scores, kind = row["scores"], row["method"]["kind"]  # type: ignore[index]
        value = (scores["training_fidelity"] + scores["recontext_fidelity"]) / 2  # type: ignore[index]
        if kind not in best or value > best[kind][0]:
            best[kind] = (value, Recipe(**row["recipe"]))  # type: ignore[arg-type]
    return {kind: recipe for kind, (_, recipe) in best.items()}


def run_benchmark(
    budget: Budget,
    model: Path,
    output: Path,
    branch: str = "conditional",
    training: TrainingSet = TRAINING_SETS["varied"],
    recipes: dict[str, Recipe] = RECIPES,
    figures: bool = True,
    methods: Sequence[Method] = METHODS,
) -> dict[str, object]:
    """Table 1 (every method over the budget's seeds) and, with ``figures``, the paper's Table 2 and
    Figures 3, 4 and 7 on the first seed."""
    output.mkdir(parents=True, exist_ok=True)
    judge = judge_module.load_judge()
    started = time.perf_counter()
    base_pipe = load_demo_model(model)
    pairs = [*training.contexts, *HELD_OUT_PAIRS[: budget.held_out_pairs]]
    ceilings = {f"{c}/{b}": vae_ceiling(base_pipe, judge, (c, b)) for c, b in pairs}
    near_miss = judge_module.near_miss_accuracy(judge, seed=7, count=300)
    fresh = [image for i, pair in enumerate(training.contexts) for image in concept_images(900 + i, 8, pair)]
    fresh_copy_ratio = copy_ratio(fresh, training.images())
    _log(f"VAE ceilings: {ceilings}; the judge reads {near_miss:.3f} of near misses as near misses")

    def run(method: Method, seed: int) -> tuple[Run, Tuned, dict[str, list[Image.Image]]]:
        return run_method(method, seed, budget, model, judge, branch, training, recipes.get(method.kind))

    runs: list[Run] = []
    grids: dict[str, list[Image.Image]] = {"training images": training.images()}
    top_atoms: dict[str, object] = {}
    for method in methods:
        for seed in budget.seeds if method.kind != "base" else budget.seeds[:1]:
            run_, tuned, images = run(method, seed)
            runs.append(run_)
            _log(f"{method.label} seed {seed}: {run_.scores} ({run_.train_seconds:.0f} s)")
            if seed == budget.seeds[0]:
                grids[method.label] = images["training prompt"] + images["held-out pairs"]
                if figures and method.kind == "ours" and method.density == 0.04 and method.plain:
                    top_atoms = _top_atoms(tuned, judge, seed, budget, branch, run_.scores, training)
    seed = budget.seeds[0]
    known = {
        (r.method.kind, r.method.density, r.method.num_atoms): r for r in runs if r.seed == seed and r.method.plain
    }

    def sweep_point(method: Method) -> Run:
        key = (method.kind, method.density, method.num_atoms)
        if key not in known:
            known[key] = run(method, seed)[0]
            _log(f"{method.label}: {known[key].scores}")
        return replace(known[key], method=method)

    density_runs, atom_runs, one_atom = [], [], {}
    if figures:
        density_runs = [sweep_point(Method(f"ours p={p}", "ours", density=p)) for p in budget.densities]
        atom_runs = [sweep_point(Method(f"M={m}", "ours", density=0.02, num_atoms=m)) for m in budget.atom_counts]
        one_atom = _one_atom_against_rank_one(budget, model, judge, branch, seed, training, recipes)
    seconds = time.perf_counter() - started

    raw: dict[str, object] = {
        "machine": machine(),
        "command": " ".join(sys.argv),
        "budget": asdict(budget),
        "branch": branch,
        "recipes": {kind: asdict(recipe) for kind, recipe in recipes.items()},
        "training_contexts": [f"{c}/{b}" for c, b in training.contexts],
        "training_images": len(training.captions()),
        "held_out_pairs": [f"{c}/{b}" for c, b in HELD_OUT_PAIRS[: budget.held_out_pairs]],
        "vae_ceilings": ceilings,
        "judge_near_miss_accuracy": near_miss,
        "fresh_render_copy_ratio": fresh_copy_ratio,
        "seconds": seconds,
        "runs": [_run_dict(run) for run in runs],
        "density_sweep": [_run_dict(run) for run in density_runs],
        "atom_sweep": [_run_dict(run) for run in atom_runs],
        "top_atoms": top_atoms,
        "one_atom": one_atom,
    }
    (output / "concept_eval.json").write_text(json.dumps(raw, indent=2) + "\n")
    report = render_report(raw)
    (output / "concept_eval.md").write_text(report)
    columns = budget.images_per_prompt * (len(training.contexts) + budget.held_out_pairs)
    labelled_grid(grids, columns).save(output / "concept_methods.png")
    print(report)
    return raw


def _top_atoms(
    tuned: Tuned, judge: judge_module.Judge, seed: int, budget: Budget, branch: str, full: Scores, training: TrainingSet
) -> dict[str, object]:
    """Figure 3: training-prompt fidelity from only the K most important atoms per block."""
    fidelity = {}
    for k in budget.top_atoms:
        images = sample(
            tuned.with_route(SampleRoute(ADAPTER, top_atoms=k)),
            [prompt for prompt in training.prompts() for _ in range(budget.images_per_prompt)],
            seed,
            budget.inference_steps,
            branch,
        )
        fidelity[k] = concept_probability(judge_module.judge_images(judge, images))
    enough = [k for k, value in fidelity.items() if value >= 0.9 * full.training_fidelity]
    return {
        "fidelity": {str(k): v for k, v in fidelity.items()},
        "all_atoms": full.training_fidelity,
        "fewest_for_90_percent": min(enough) if enough else None,
    }


def _one_atom_against_rank_one(
    budget: Budget,
    model: Path,
    judge: judge_module.Judge,
    branch: str,
    seed: int,
    training: TrainingSet,
    recipes: dict[str, Recipe],
) -> dict[str, object]:
    """Figure 4: one active atom (k = 1) against LoRA r = 1, each trained on the concept, asked
    for it under modified prompts (the held-out pairs). Coherent: the judge reads a shape of the
    world (the concept or a base shape, not "other") with probability > 0.5, in the prompted
    colour and background."""
    results = {}
    for method in (Method("ours, one active atom", "ours", density=1 / 256), Method("LoRA r=1", "lora", rank=1)):
        tuned = fine_tune(method, recipes[method.kind], seed, budget, model, training)
        prompts = [
            world.caption(world.CONCEPT_TOKEN, *pair)
            for pair in HELD_OUT_PAIRS[: budget.held_out_pairs]
            for _ in range(budget.images_per_prompt)
        ]
        wanted = [pair for pair in HELD_OUT_PAIRS[: budget.held_out_pairs] for _ in range(budget.images_per_prompt)]
        verdict = judge_module.judge_images(judge, sample(tuned, prompts, seed + 1, budget.inference_steps, branch))
        shape = verdict.probabilities["shape"]
        other = world.JUDGE_SHAPES.index(world.OTHER)
        readable = np.delete(shape, other, axis=1).max(1) > 0.5
        coherent = [
            bool(r) and c == w[0] and b == w[1]
            for r, c, b, w in zip(readable, verdict.labels["colour"], verdict.labels["background"], wanted, strict=True)
        ]
        trained = sample(
            tuned,
            [prompt for prompt in training.prompts() for _ in range(budget.images_per_prompt)],
            seed,
            budget.inference_steps,
            branch,
        )
        results[method.label] = {
            "coherent": float(np.mean(coherent)),
            "readable_shape": float(readable.mean()),
            "held_out_fidelity": concept_probability(verdict),
            "training_fidelity": concept_probability(judge_module.judge_images(judge, trained)),
        }
        _log(f"{method.label}: {results[method.label]}")
    return results


def _run_dict(run: Run) -> dict[str, object]:
    return {
        "method": asdict(run.method),
        "recipe": asdict(run.recipe),
        "seed": run.seed,
        "scores": asdict(run.scores),
        "trainable_parameters": run.trainable_parameters,
        "train_seconds": run.train_seconds,
    }


# -- the report ---------------------------------------------------------------------------------

COLUMNS = (
    ("training_fidelity", "training-prompt fidelity"),
    ("recontext_fidelity", "held-out fidelity"),
    ("recontext_colour", "colour honoured"),
    ("recontext_background", "background honoured"),
    ("preservation", "preservation"),
    ("diversity", "diversity (Vendi)"),
    ("copy_ratio", "copy ratio"),
)


def render_report(raw: dict[str, object]) -> str:
    runs = raw["runs"]
    assert isinstance(runs, list)
    ceilings = raw["vae_ceilings"]
    assert isinstance(ceilings, dict)
    lines = [
        f"Concept: striped heart as `{world.CONCEPT_TOKEN}`, {raw['training_images']} images in "
        f"{', '.join(raw['training_contexts'])} (each captioned with its context); "  # type: ignore[arg-type]
        f"adapters on the {raw['branch']} guidance branch; held-out pairs {', '.join(raw['held_out_pairs'])}; "  # type: ignore[arg-type]
        f"{raw['machine']}; total {float(raw['seconds']) / 60:.1f} min (`{raw['command']}`).",  # type: ignore[arg-type]
        "",
        "VAE ceilings (concept probability of the VAE round trip of the concept's renders): "
        + ", ".join(f"{pair} {value:.3f}" for pair, value in ceilings.items())
        + f". The judge reads {raw['judge_near_miss_accuracy']:.3f} of near misses (a heart without stripes, "
        "striped or dark base shapes) as near misses, not as the concept. Copy ratio of fresh renders of the "
        f"concept in the training contexts (what an ideal generator scores): {raw['fresh_render_copy_ratio']:.2f}.",
        "",
        "**Methods (the paper's Table 1)**, mean ± 95 % interval over seeds",
        "",
        "| method | " + " | ".join(title for _, title in COLUMNS) + " | recipe | trainable params | fine-tune s |",
        "|---" * (len(COLUMNS) + 4) + "|",
    ]
    lines += _rows(runs)
    for key, title in (
        ("density_sweep", "Density p, M = 256 (Figure 7)"),
        ("atom_sweep", "Atoms M, p = 0.02 (Table 2)"),
    ):
        if not raw[key]:
            continue
        lines += [
            "",
            f"**{title}**, seed {raw['budget']['seeds'][0]}",
            "",
            "| setting | " + " | ".join(t for _, t in COLUMNS) + " | recipe | params | s |",
            "|---" * (len(COLUMNS) + 4) + "|",
        ]  # type: ignore[index]
        lines += _rows(raw[key])  # type: ignore[arg-type]
    top = raw["top_atoms"]
    if top:
        lines += [
            "",
            "**Top-K atoms per block (Figure 3)**: training-prompt fidelity",
            "",
            "| K | fidelity |",
            "|---|---|",
        ]
        lines += [f"| {k} | {v:.3f} |" for k, v in top["fidelity"].items()]  # type: ignore[index, union-attr]
        lines += [
            f"| all | {top['all_atoms']:.3f} |",
            "",
            f"Fewest atoms per block keeping ≥ 90 % of the full fidelity: {top['fewest_for_90_percent']}",
        ]  # type: ignore[index]
    if raw["one_atom"]:
        lines += [
            "",
            "**One active atom against LoRA r = 1 under modified prompts (Figure 4)**",
            "",
            "| method | coherent | readable shape | held-out fidelity | training fidelity |",
            "|---|---|---|---|---|",
        ]
    for label, values in raw["one_atom"].items():  # type: ignore[union-attr]
        lines.append(
            f"| {label} | {values['coherent']:.3f} | {values['readable_shape']:.3f} "
            f"| {values['held_out_fidelity']:.3f} | {values['training_fidelity']:.3f} |"
        )
    return "\n".join(lines) + "\n"


def _rows(runs: list[dict[str, object]]) -> list[str]:
    by_label: dict[str, list[dict[str, object]]] = {}
    for run in runs:
        by_label.setdefault(run["method"]["label"], []).append(run)  # type: ignore[index]
    rows = []
    for label, group in by_label.items():
        cells = []
        for key, _ in COLUMNS:
            mean, half = interval([run["scores"][key] for run in group])  # type: ignore[index]
            cells.append(f"{mean:.3f} ± {half:.3f}" if len(group) > 1 else f"{mean:.3f}")
        recipe = group[0]["recipe"]
        seconds = np.mean([run["train_seconds"] for run in group])
        rows.append(
            f"| {label} | {' | '.join(cells)} | lr {recipe['learning_rate']:g}, {recipe['steps']} steps "  # type: ignore[index]
            f"| {group[0]['trainable_parameters']:,} | {seconds:.0f} |"
        )
    return rows


def labelled_grid(rows: dict[str, list[Image.Image]], columns: int, scale: int = 1) -> Image.Image:
    """Rows of images with their label in a left margin."""
    from PIL import ImageDraw

    side = next(iter(rows.values()))[0].size[0] * scale
    margin = 150
    sheet = Image.new("RGB", (margin + columns * side, len(rows) * side), "white")
    draw = ImageDraw.Draw(sheet)
    for r, (label, images) in enumerate(rows.items()):
        draw.text((4, r * side + side // 2 - 6), label, fill="black")
        for c, image in enumerate(images[:columns]):
            sheet.paste(image.resize((side, side), Image.Resampling.NEAREST), (margin + c * side, r * side))
    return sheet


def machine() -> str:
    return f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one seed, a few steps, small sweeps")
    parser.add_argument("--sweep", action="store_true", help="each method's learning rate x steps")
    parser.add_argument("--branch", default="conditional", choices=("conditional", "both"))
    parser.add_argument("--model", type=Path, default=DEMO_MODEL)
    parser.add_argument("--output", type=Path, default=RESULTS)
    parser.add_argument("--training", default="varied", choices=tuple(TRAINING_SETS))
    parser.add_argument("--recipes", type=Path, help="a --sweep's concept_sweep.json: use its best recipe per method")
    parser.add_argument("--methods-only", action="store_true", help="the methods table only, no sweeps or figures")
    parser.add_argument("--methods", help="comma-separated labels of the methods to run (default: all)")
    parser.add_argument("--seeds", type=int, help="run this many seeds (default: the budget's)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    quiet_progress_bars()
    budget = QUICK if args.quick else FULL
    if args.seeds is not None:
        budget = replace(budget, seeds=tuple(range(args.seeds)))
    training = TRAINING_SETS[args.training]
    if args.sweep:
        run_sweep(budget, args.model, args.output, args.branch, training)
        return
    recipes = RECIPES
    if args.recipes is not None:
        recipes = {**RECIPES, **best_recipes(json.loads(args.recipes.read_text())["sweep"])}
    methods = METHODS
    if args.methods:
        wanted = args.methods.split(",")
        if unknown := sorted(set(wanted) - {m.label for m in METHODS}):
            parser.error(f"unknown methods {unknown}; choose from {[m.label for m in METHODS]}")
        methods = tuple(m for m in METHODS if m.label in wanted)
    run_benchmark(
        budget, args.model, args.output, args.branch, training, recipes, figures=not args.methods_only, methods=methods
    )


if __name__ == "__main__":
    main()
