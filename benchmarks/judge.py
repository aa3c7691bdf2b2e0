"""A small classifier that reads shape, colour and background off an image of the synthetic world.

It stands in for the CLIP / DINO scorers of the paper, which cannot be downloaded here: trained on
the renderer's ground truth (the novel concept included, as an extra shape class, and near misses
of it as an "other" class), it tells whether a generated image shows what its prompt asked for,
and its penultimate features serve as the embedding for the Vendi diversity score.

Retrain the shipped weights with `python -m benchmarks.judge` (about two minutes on two cores).
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn import functional as F

from benchmarks import world

WEIGHTS = Path(__file__).with_name("judge.safetensors")
ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "shape": world.JUDGE_SHAPES,
    "colour": tuple(world.COLOURS),
    "background": tuple(world.BACKGROUNDS),
}
EMBEDDING_DIM = 64


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1),
        nn.BatchNorm2d(cout),
        nn.ReLU(),
        nn.Conv2d(cout, cout, 3, padding=1),
        nn.BatchNorm2d(cout),
        nn.ReLU(),
        nn.MaxPool2d(2),
    )


class Judge(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(_block(3, 16), _block(16, 32), _block(32, 64))
        self.embed = nn.Linear(64 * 4 * 4, EMBEDDING_DIM)
        self.heads = nn.ModuleDict({name: nn.Linear(EMBEDDING_DIM, len(v)) for name, v in ATTRIBUTES.items()})

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """`pixels` [N, 3, 32, 32] in [-1, 1] -> (embedding [N, EMBEDDING_DIM], logits per attribute)."""
        embedding = F.relu(self.embed(self.features(pixels).flatten(1)))
        return embedding, {name: head(embedding) for name, head in self.heads.items()}


@dataclass
class Verdict:
    """What the judge reads off a batch of images: one label per attribute per image."""

    labels: dict[str, list[str]]
    probabilities: dict[str, np.ndarray]
    """Per attribute, [N, classes] softmax over `ATTRIBUTES[attribute]`."""
    embeddings: np.ndarray


def load_judge(path: Path = WEIGHTS) -> Judge:
    judge = Judge()
    judge.load_state_dict(load_file(str(path)))
    return judge.eval()


@torch.no_grad()
def judge_images(judge: Judge, images: list[Image.Image]) -> Verdict:
    pixels = torch.from_numpy(world.to_array([_resized(image) for image in images]))
    embedding, logits = judge(pixels)
    labels: dict[str, list[str]] = {}
    probabilities: dict[str, np.ndarray] = {}
    for name, values in ATTRIBUTES.items():
        probs = logits[name].softmax(-1)
        labels[name] = [values[i] for i in probs.argmax(-1).tolist()]
        probabilities[name] = probs.numpy()
    return Verdict(labels=labels, probabilities=probabilities, embeddings=embedding.numpy())


def _resized(image: Image.Image) -> Image.Image:
    size = (world.IMAGE_SIZE, world.IMAGE_SIZE)
    return image if image.size == size else image.resize(size, Image.Resampling.BOX)


def vendi_score(embeddings: np.ndarray) -> float:
    """Vendi score (Friedman & Dieng, 2023) with a cosine-similarity kernel: the effective number of
    distinct images, between 1 (all the same) and the number of images (all orthogonal)."""
    x = embeddings / np.maximum(np.linalg.norm(embeddings, axis=1, keepdims=True), 1e-8)
    eigenvalues = np.linalg.eigvalsh(x @ x.T / len(x))
    eigenvalues = eigenvalues[eigenvalues > 1e-12]
    return float(np.exp(-(eigenvalues * np.log(eigenvalues)).sum()))


# A quarter of every training batch are near misses of the concept (`world.OTHER`): without
# them the judge read any shape drawn in a dark shade as the concept, and scored the untuned
# demo model's guesses at "sks" as striped hearts.
NEAR_MISS_SHARE = 0.25
# Cross-entropy skips this target: a shape drawn in the dark shade has no colour of the world.
NO_LABEL = -100


def _labelled_batch(rng: np.random.Generator, size: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """World renders and near misses (a plain heart, a striped base shape, any shape in the dark
    shade), with their targets per attribute."""
    combos = world.all_combinations() + world.concept_combinations()
    images, labels = [], []
    for pick, near_miss in zip(rng.integers(0, len(combos), size), rng.random(size) < NEAR_MISS_SHARE, strict=True):
        scene = world.sample_scene(rng, *combos[pick])
        own = "striped" if scene.shape == world.CONCEPT else "plain"
        texture = str(rng.choice([t for t in world.TEXTURES if t != own])) if near_miss else own
        images.append(world.render(scene, texture=texture))
        labels.append(
            {
                "shape": world.JUDGE_SHAPES.index(world.OTHER if near_miss else scene.shape),
                "colour": NO_LABEL if texture == "dark" else ATTRIBUTES["colour"].index(scene.colour),
                "background": ATTRIBUTES["background"].index(scene.background),
            }
        )
    pixels = torch.from_numpy(world.to_array(images))
    return pixels, {name: torch.tensor([label[name] for label in labels]) for name in ATTRIBUTES}


def _degrade(pixels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Noise and blur of random strength, so the judge also reads the imperfect images a small
    diffusion model draws rather than only the renderer's clean edges."""
    n = pixels.shape[0]
    blur = F.avg_pool2d(F.pad(pixels, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    weight = torch.rand(n, 1, 1, 1, generator=generator) * 0.7
    pixels = torch.lerp(pixels, blur, weight)
    noise = torch.randn(pixels.shape, generator=generator) * torch.rand(n, 1, 1, 1, generator=generator) * 0.15
    return (pixels + noise).clamp(-1, 1)


def train_judge(seed: int = 0, steps: int = 1500, batch_size: int = 64) -> Judge:
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    generator = torch.Generator().manual_seed(seed)
    judge = Judge()
    optimiser = torch.optim.AdamW(judge.parameters(), lr=2e-3, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, max_lr=2e-3, total_steps=steps)
    judge.train()
    for step in range(steps):
        pixels, targets = _labelled_batch(rng, batch_size)
        _, logits = judge(_degrade(pixels, generator))
        loss = sum(F.cross_entropy(logits[name], targets[name], ignore_index=NO_LABEL) for name in ATTRIBUTES)
        optimiser.zero_grad()
        loss.backward()  # type: ignore[union-attr]
        optimiser.step()
        schedule.step()
        if step % 200 == 0:
            print(f"step {step} loss {loss.item():.4f}", flush=True)  # type: ignore[union-attr]
    return judge.eval()


@torch.no_grad()
def accuracy_on_renders(judge: Judge, seed: int, count: int) -> dict[str, float]:
    """Per-attribute accuracy on freshly rendered images and near misses (clean, no degradation)."""
    rng = np.random.default_rng(seed)
    pixels, targets = _labelled_batch(rng, count)
    _, logits = judge(pixels)
    accuracy = {}
    for name in ATTRIBUTES:
        labelled = targets[name] != NO_LABEL
        accuracy[name] = float((logits[name].argmax(-1) == targets[name])[labelled].float().mean())
    return accuracy


@torch.no_grad()
def near_miss_accuracy(judge: Judge, seed: int, count: int) -> float:
    """The share of near misses (a heart without stripes, striped or dark base shapes) the judge
    reads as "other" rather than as the concept or a base shape."""
    rng = np.random.default_rng(seed)
    hearts = world.scenes(seed, count // 3, world.concept_combinations())
    shapes = list(world.scenes(seed + 1, count - count // 3, world.all_combinations()))
    images = [world.render(scene, texture="plain") for scene in hearts]
    images += [world.render(scene, texture=str(rng.choice(["striped", "dark"]))) for scene in shapes]
    return float(np.mean([label == world.OTHER for label in judge_images(judge, images).labels["shape"]]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--output", type=Path, default=WEIGHTS)
    args = parser.parse_args()
    torch.set_num_threads(min(2, torch.get_num_threads()))
    start = time.perf_counter()
    judge = train_judge(seed=args.seed, steps=args.steps)
    print(f"trained in {time.perf_counter() - start:.0f} s")
    print("accuracy on fresh renders:", accuracy_on_renders(judge, seed=args.seed + 1000, count=2000))
    save_file({k: v.contiguous() for k, v in judge.state_dict().items()}, str(args.output))


if __name__ == "__main__":
    main()
