"""Concept customisation on the demo model: the paper's Table 1, Table 2, Figures 3 and 7, measured.

The concept is a striped heart (`world.CONCEPT`), a shape and texture the demo model never saw,
learned from five images under the rare token "sks" with the prompt
"a green sks on a white background". Evaluation prompts recolour it and move it to other
backgrounds. The judge scores every generated image:

* fidelity: its mean probability that an image shows the concept (the paper: CLIP-I to the
  concept images);
* text alignment: the share where it finds the prompted colour, and the prompted background,
  and their mean (the paper: CLIP-T);
* diversity: the Vendi score of its embeddings over the images of one prompt, averaged over
  prompts (the paper: Vendi over DINOv2 embeddings).

    python -m benchmarks.concept_eval            # the full benchmark (8 min on 2 cores)
    python -m benchmarks.concept_eval --quick    # a few minutes: one seed, a few steps, small sweeps

Outputs land in `benchmarks/results/` (`--output` to change): `concept_eval.md` (tables),
`concept_eval.json` (every number), `density_sweep.png`, `top_atoms.png` and image grids.
"""

from __future__ import annotations

import argparse
import json
import time
from contextlib import nullcontext
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
from benchmarks.train_demo_model import DEMO_MODEL, RESULTS, generation_kwargs, load_demo_model, quiet_progress_bars

TRAIN_COLOUR, TRAIN_BACKGROUND = "green", "white"
TRAIN_PROMPT = world.caption(world.CONCEPT_TOKEN, TRAIN_COLOUR, TRAIN_BACKGROUND)
# Recolourings and new backgrounds, none the training pair; the first ones are the quick subset.
EVAL_PAIRS: tuple[tuple[str, str], ...] = (
    ("red", "black"),
    ("blue", "pink"),
    ("yellow", "grey"),
    ("green", "black"),
    ("purple", "white"),
    ("orange", "pink"),
    ("blue", "grey"),
    ("red", "white"),
)
CONCEPT_IMAGES = 5
ADAPTER = "concept"


@dataclass(frozen=True)
class Method:
    label: str
    kind: str  # "ours", a PEFT baseline ("lora", "dora", "oft") or "base" (no fine-tuning)
    density: float = 0.04
    num_atoms: int = 256


@dataclass(frozen=True)
class Budget:
    steps: int
    learning_rate: float
    batch_size: int
    seeds: tuple[int, ...]
    prompts: int
    images_per_prompt: int
    inference_steps: int
    densities: tuple[float, ...]
    atom_counts: tuple[int, ...]
    top_atoms: tuple[int, ...]


FULL = Budget(
    steps=400,
    learning_rate=3e-3,
    batch_size=4,
    seeds=(0, 1, 2),
    prompts=len(EVAL_PAIRS),
    images_per_prompt=4,
    inference_steps=20,
    densities=(0.01, 0.02, 0.04, 0.08, 0.16, 0.32),
    atom_counts=(16, 64, 256, 1024),
    top_atoms=(1, 2, 4, 8, 16, 40),
)
QUICK = Budget(
    steps=20,
    learning_rate=3e-3,
    batch_size=2,
    seeds=(0,),
    prompts=2,
    images_per_prompt=2,
    inference_steps=8,
    densities=(0.02, 0.08),
    atom_counts=(16, 256),
    top_atoms=(4,),
)

METHODS: tuple[Method, ...] = (
    Method("base model (no tuning)", "base"),
    Method("ours p=0.02", "ours", density=0.02),
    Method("ours p=0.04", "ours", density=0.04),
    Method("LoRA r=16", "lora"),
    Method("DoRA r=16", "dora"),
    Method("OFT r=4", "oft"),
)


@dataclass
class Scores:
    fidelity: float
    colour: float
    background: float
    alignment: float
    diversity: float

    @staticmethod
    def mean(runs: list[Scores]) -> tuple[Scores, Scores]:
        """Mean and standard deviation over runs, field by field."""
        values = np.array([list(asdict(run).values()) for run in runs])
        names = list(asdict(runs[0]))
        mean = Scores(**dict(zip(names, values.mean(0).tolist(), strict=True)))
        std = Scores(**dict(zip(names, values.std(0).tolist(), strict=True)))
        return mean, std


@dataclass
class Run:
    method: Method
    seed: int
    scores: Scores
    trainable_parameters: int
    train_seconds: float
    training_prompt_fidelity: float
    top_atoms: dict[int, Scores] = field(default_factory=dict)


def concept_images(seed: int = 0, count: int = CONCEPT_IMAGES) -> list[Image.Image]:
    """The five training images: one colour on one background, varied position, size and angle."""
    combos = [(world.CONCEPT, TRAIN_COLOUR, TRAIN_BACKGROUND)]
    size = int(generation_kwargs()["height"])  # type: ignore[call-overload]
    return [world.render(scene, size) for scene in world.scenes(seed, count, combos)]


def eval_prompts(budget: Budget) -> list[tuple[str, str, str]]:
    """(prompt, colour, background) per generated image, grouped by prompt."""
    return [
        (world.caption(world.CONCEPT_TOKEN, colour, background), colour, background)
        for colour, background in EVAL_PAIRS[: budget.prompts]
        for _ in range(budget.images_per_prompt)
    ]


def score(judge: judge_module.Judge, images: list[Image.Image], budget: Budget) -> Scores:
    prompts = eval_prompts(budget)
    verdict = judge_module.judge_images(judge, images)
    fidelity = _concept_probability(verdict)
    colour = np.mean([label == p[1] for label, p in zip(verdict.labels["colour"], prompts, strict=True)])
    background = np.mean([label == p[2] for label, p in zip(verdict.labels["background"], prompts, strict=True)])
    per_prompt = verdict.embeddings.reshape(budget.prompts, budget.images_per_prompt, -1)
    diversity = np.mean([judge_module.vendi_score(group) for group in per_prompt])
    return Scores(
        fidelity=float(fidelity),
        colour=float(colour),
        background=float(background),
        alignment=float((colour + background) / 2),
        diversity=float(diversity),
    )


def _concept_probability(verdict: judge_module.Verdict) -> float:
    """Mean judge probability of the concept class: continuous, like the paper's CLIP-I similarity,
    so partial likeness still counts where an argmax would read 0 for every method."""
    return float(verdict.probabilities["shape"][:, world.JUDGE_SHAPES.index(world.CONCEPT)].mean())


def generate(
    pipe: PixArtSigmaPipeline,
    prompts: list[str],
    seed: int,
    budget: Budget,
    host: AdapterHost | None = None,
    route: SampleRoute | None = None,
) -> list[Image.Image]:
    """Every method draws from the same initial noise for the same seed."""
    images: list[Image.Image] = []
    for start in range(0, len(prompts), 16):
        chunk = prompts[start : start + 16]
        routing = host.route([route] * len(chunk)) if host is not None and route is not None else nullcontext()
        generator = torch.Generator().manual_seed(10_000 * seed + start)
        with routing:
            images += pipe(chunk, generator=generator, **generation_kwargs(budget.inference_steps)).images
    return images


def training_config(budget: Budget, seed: int) -> TrainingConfig:
    return TrainingConfig(
        steps=budget.steps,
        learning_rate=budget.learning_rate,
        batch_size=budget.batch_size,
        seed=seed,
        max_sequence_length=TINY_MAX_SEQUENCE_LENGTH,
    )


def run_method(
    method: Method,
    seed: int,
    budget: Budget,
    model: Path,
    judge: judge_module.Judge,
    top_atoms: tuple[int, ...] = (),
) -> tuple[Run, list[Image.Image], dict[int, list[Image.Image]]]:
    """Train one method on the concept, generate the evaluation prompts and score them.

    For our method, `top_atoms` also generates from only the K most important atoms per layer
    (the paper's Figure 3); those images come back keyed by K.
    """
    prompts = [p[0] for p in eval_prompts(budget)]
    samples = concept_images()
    config = training_config(budget, seed)
    by_k: dict[int, list[Image.Image]] = {}
    top_scores: dict[int, Scores] = {}
    # PEFT wraps the transformer in place, so every run starts from a freshly loaded base model.
    pipe = load_demo_model(model)
    host: AdapterHost | None = None
    route: SampleRoute | None = None
    parameters = 0
    start = time.perf_counter()
    if method.kind == "ours":
        host = AdapterHost(pipe.transformer)
        adapter_config = SparseDictionaryConfig(num_atoms=method.num_atoms, density=method.density)
        result = train_adapter(pipe, host, samples, TRAIN_PROMPT, adapter_config, config)
        parameters = sum(p.numel() for p in result.adapter.parameters())
        host.add(ADAPTER, result.adapter)
        route = SampleRoute(ADAPTER)
    elif method.kind != "base":
        baseline = train_baseline(pipe, samples, TRAIN_PROMPT, method.kind, config)  # type: ignore[arg-type]
        parameters = sum(p.numel() for name, p in baseline.model.named_parameters() if _is_peft(name))
    seconds = time.perf_counter() - start
    images = generate(pipe, prompts, seed, budget, host, route)
    for k in top_atoms:
        by_k[k] = generate(pipe, prompts, seed, budget, host, SampleRoute(ADAPTER, top_atoms=k))
        top_scores[k] = score(judge, by_k[k], budget)
    # Fidelity on the training prompt itself separates "did not learn the concept" from "learned
    # it but cannot recolour or move it".
    recall = generate(pipe, [TRAIN_PROMPT] * budget.images_per_prompt, seed, budget, host, route)
    recall_fidelity = _concept_probability(judge_module.judge_images(judge, recall))
    run = Run(method, seed, score(judge, images, budget), parameters, seconds, recall_fidelity, top_scores)
    return run, images, by_k


def _is_peft(name: str) -> bool:
    return any(tag in name for tag in ("lora_", "oft_"))


def _setting(method: Method) -> tuple[str, float, int]:
    return method.kind, method.density, method.num_atoms


def _summarise(runs: list[Run]) -> dict[str, tuple[Scores, Scores, int, float]]:
    """Per method label: mean scores, their std over seeds, parameters, mean training seconds."""
    summary: dict[str, tuple[Scores, Scores, int, float]] = {}
    for label in dict.fromkeys(run.method.label for run in runs):
        mine = [run for run in runs if run.method.label == label]
        mean, std = Scores.mean([run.scores for run in mine])
        summary[label] = (mean, std, mine[0].trainable_parameters, float(np.mean([r.train_seconds for r in mine])))
    return summary


def _table(runs: list[Run], title: str) -> str:
    seeds = len({run.seed for run in runs})
    lines = [
        f"**{title}** (mean ± std over {seeds} seed{'s' if seeds > 1 else ''})",
        "",
        "| method | fidelity | colour | background | alignment | diversity (Vendi) "
        "| fidelity, training prompt | trainable params | train time (s) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for label, (mean, std, parameters, seconds) in _summarise(runs).items():
        cells = [f"{getattr(mean, k):.3f} ± {getattr(std, k):.3f}" for k in asdict(mean)]
        recall = np.mean([run.training_prompt_fidelity for run in runs if run.method.label == label])
        lines.append(f"| {label} | {' | '.join(cells)} | {recall:.3f} | {parameters:,} | {seconds:.1f} |")
    return "\n".join(lines) + "\n"


def _top_atoms_table(run: Run) -> str:
    lines = [
        f"**Generation from the top-K atoms per layer** ({run.method.label}, seed {run.seed}, "
        f"{run.method.num_atoms} atoms, {round(run.method.density * run.method.num_atoms)} active per token)",
        "",
        "| K | fidelity | colour | background | alignment | diversity |",
        "|---|---|---|---|---|---|",
    ]
    rows = [*sorted(run.top_atoms.items()), ("all", run.scores)]
    for k, scores in rows:
        lines.append(f"| {k} | " + " | ".join(f"{v:.3f}" for v in asdict(scores).values()) + " |")
    return "\n".join(lines) + "\n"


def _density_plot(sweep: list[Run], baselines: list[Run], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(10, 4))
    ours = _summarise(sweep)
    fidelity = [mean.fidelity for mean, _, _, _ in ours.values()]
    for axis, metric in zip(axes, ("alignment", "diversity"), strict=True):
        values = [getattr(mean, metric) for mean, _, _, _ in ours.values()]
        axis.plot(fidelity, values, "o-", color="tab:blue", label="ours (density sweep)")
        for run_label, x, y in zip(ours, fidelity, values, strict=True):
            axis.annotate(run_label.split("=")[-1], (x, y), textcoords="offset points", xytext=(4, 4))
        for label, (mean, _, _, _) in _summarise(baselines).items():
            axis.plot(mean.fidelity, getattr(mean, metric), "s", label=label)
        axis.set_xlabel("fidelity (judge: is the concept)")
        axis.set_ylabel(metric)
        axis.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    figure.suptitle("Density p against fidelity (the paper's Figure 7)")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def _labelled_grid(rows: dict[str, list[Image.Image]], columns: int, scale: int = 2) -> Image.Image:
    """Rows of images with their label in a left margin."""
    from PIL import ImageDraw

    first = next(iter(rows.values()))[0]
    side = first.size[0] * scale
    margin = 150
    sheet = Image.new("RGB", (margin + columns * side, len(rows) * side), "white")
    draw = ImageDraw.Draw(sheet)
    for r, (label, images) in enumerate(rows.items()):
        draw.text((4, r * side + side // 2 - 6), label, fill="black")
        for c, image in enumerate(images[:columns]):
            sheet.paste(image.resize((side, side), Image.Resampling.NEAREST), (margin + c * side, r * side))
    return sheet


def run_benchmark(budget: Budget, model: Path, output: Path) -> dict[str, object]:
    output.mkdir(parents=True, exist_ok=True)
    judge = judge_module.load_judge()
    started = time.perf_counter()
    runs: list[Run] = []
    grids: dict[str, list[Image.Image]] = {"training images": concept_images()}
    top_run: Run | None = None
    top_images: dict[int, list[Image.Image]] = {}
    for method in METHODS:
        for seed in budget.seeds if method.kind != "base" else budget.seeds[:1]:
            wants_top = method.kind == "ours" and method.density == 0.04 and seed == budget.seeds[0]
            run, images, by_k = run_method(method, seed, budget, model, judge, budget.top_atoms if wants_top else ())
            runs.append(run)
            print(f"{method.label} seed {seed}: {run.scores} ({run.train_seconds:.0f} s)", flush=True)
            if seed == budget.seeds[0]:
                grids[method.label] = images
            if wants_top:
                top_run, top_images = run, by_k
    sweep_seed = budget.seeds[0]
    # Sweep points that a table row already trained (same method, density and M) are reused.
    known = {_setting(run.method): run for run in runs if run.seed == sweep_seed}

    def sweep(methods: list[Method]) -> list[Run]:
        results = []
        for method in methods:
            if _setting(method) not in known:
                known[_setting(method)] = run_method(method, sweep_seed, budget, model, judge)[0]
                print(f"{method.label}: {known[_setting(method)].scores}", flush=True)
            results.append(replace(known[_setting(method)], method=method))
        return results

    density_runs = sweep([Method(f"ours p={p}", "ours", density=p) for p in budget.densities])
    # The paper's Table 2 holds density fixed; below M=50 a density of 0.02 rounds up to one atom.
    atom_runs = sweep([Method(f"M={m}", "ours", density=0.02, num_atoms=m) for m in budget.atom_counts])
    seconds = time.perf_counter() - started

    baselines = [run for run in runs if run.method.kind in ("lora", "dora", "oft")]
    _density_plot(density_runs, baselines, output / "density_sweep.png")
    columns = budget.prompts * budget.images_per_prompt
    _labelled_grid(grids, columns).save(output / "concept_methods.png")
    if top_run is not None:
        rows = {f"top {k} atoms": images for k, images in top_images.items()}
        rows["all atoms"] = grids[top_run.method.label]
        _labelled_grid(rows, columns).save(output / "top_atoms.png")
    report = "\n".join(
        [
            f"Concept: striped heart as `{world.CONCEPT_TOKEN}`, {CONCEPT_IMAGES} images, prompt "
            f'"{TRAIN_PROMPT}"; {budget.steps} steps, batch {budget.batch_size}, AdamW lr '
            f"{budget.learning_rate} for every method; {budget.prompts} evaluation prompts x "
            f"{budget.images_per_prompt} images, {budget.inference_steps} sampling steps. "
            f"Total {seconds / 60:.1f} min.",
            "",
            _table(runs, "Methods (the paper's Table 1)"),
            _table(density_runs, f"Density sweep, M=256 (the paper's Figure 7; seed {sweep_seed})"),
            _table(atom_runs, f"Atom-count sweep, p=0.02 (the paper's Table 2; seed {sweep_seed})"),
            _top_atoms_table(top_run) if top_run is not None else "",
        ]
    )
    (output / "concept_eval.md").write_text(report)
    raw = {
        "budget": asdict(budget),
        "seconds": seconds,
        "runs": [_run_dict(run) for run in runs],
        "density_sweep": [_run_dict(run) for run in density_runs],
        "atom_sweep": [_run_dict(run) for run in atom_runs],
    }
    (output / "concept_eval.json").write_text(json.dumps(raw, indent=2) + "\n")
    print(report)
    return raw


def _run_dict(run: Run) -> dict[str, object]:
    return {
        "method": asdict(run.method),
        "seed": run.seed,
        "scores": asdict(run.scores),
        "trainable_parameters": run.trainable_parameters,
        "train_seconds": run.train_seconds,
        "training_prompt_fidelity": run.training_prompt_fidelity,
        "top_atoms": {str(k): asdict(v) for k, v in run.top_atoms.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="CI mode: one seed, few steps, small sweeps")
    parser.add_argument("--model", type=Path, default=DEMO_MODEL)
    parser.add_argument("--output", type=Path, default=RESULTS)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, help="override the budget's training steps")
    parser.add_argument("--learning-rate", type=float, help="override the budget's learning rate")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    quiet_progress_bars()
    budget = QUICK if args.quick else FULL
    if args.steps is not None:
        budget = replace(budget, steps=args.steps)
    if args.learning_rate is not None:
        budget = replace(budget, learning_rate=args.learning_rate)
    run_benchmark(budget, args.model, args.output)


if __name__ == "__main__":
    main()
