"""Train the bundled demo model: a tiny PixArt-Σ pipeline that draws the synthetic shapes world.

    python -m benchmarks.train_demo_model --output models/demo

Everything is rebuilt from seeds: the tokenizer, the frozen, randomly initialised T5 encoder and
the transformer's architecture come from `adapters.tiny`; the VAE (`adapters.tiny`'s geometry,
wider channels) is trained first as a plain autoencoder on rendered images; then the transformer
learns to denoise their latents with the PixArt-Σ recipe (DDPM noise, epsilon target, MSE,
learned-sigma half of the output ignored), conditioned on cached caption embeddings, with 10%
empty captions for classifier-free guidance, from DiT's adaLN-Zero start and with the learning
rate decayed linearly to zero at the end.
The caption combinations `world.held_out_combinations()` are never shown, so the evaluation below
measures composition, not recall.

    python -m benchmarks.train_demo_model --evaluate models/demo

generates images for every held-out combination and reports how often the judge recognises the
prompted shape, colour and background, and how long four images take.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL, DDPMScheduler, PixArtSigmaPipeline, PixArtTransformer2DModel
from diffusers.utils import logging as diffusers_logging
from PIL import Image
from safetensors.torch import load_file
from torch.nn import functional as F
from transformers.utils import logging as transformers_logging

from adapters.tiny import TINY_LATENT_CHANNELS, TINY_MAX_SEQUENCE_LENGTH, build_tiny_pipeline
from benchmarks import judge as judge_module
from benchmarks import world

DEMO_MODEL = Path(__file__).resolve().parent.parent / "models" / "demo"
RESULTS = Path(__file__).resolve().parent / "results"
# The demo model draws at 64 px: the 8x VAE of `adapters.tiny` then gives an 8x8 latent, 16 tokens.
RESOLUTION = 64
# Transformer shape: 4 heads (the adapters' 256 atoms split evenly across them) of width 32, 4 blocks.
# On two cores for equal time, 4 blocks train twice the steps of 8 and learned shapes faster (held-out
# shapes 34 % against 26 % after 7 minutes each; benchmarks/RESULTS.md); wider models are slower still.
NUM_LAYERS = 4
NUM_HEADS = 4
HEAD_DIM = 32
GUIDANCE_SCALE = 4.5
INFERENCE_STEPS = 20
CAPTION_DROPOUT = 0.1
# The shape covers a fifth of the image or less; unweighted, the VAE's loss is mostly background
# and it learns to blur shapes and drift their colours (red drawn orange, green drawn grey).
FOREGROUND_WEIGHT = 4.0
# The VAE is an image codec shared by every concept, like PixArt-Σ's SDXL VAE that has seen hearts
# and stripes among billions of images. Ours has seen only this world, so it learns every image the
# world can draw, the benchmark's concept included; without it the concept's reconstructions lose
# heart and stripes and no adapter could score any fidelity. Only pixels: the text encoder and the
# transformer never see the concept, nor the held-out captions.
VAE_COMBINATIONS = world.all_combinations() + world.concept_combinations()


@dataclass
class TrainingSettings:
    seed: int = 0
    vae_steps: int = 3000
    vae_batch_size: int = 16
    vae_learning_rate: float = 2e-3
    images: int = 32768
    steps: int = 32000
    batch_size: int = 32
    learning_rate: float = 1.6e-3
    warmup_steps: int = 200
    # The learning rate falls linearly to zero over the last `warmdown_steps`.
    warmdown_steps: int = 9600
    ema_decay: float = 0.999
    checkpoint_every: int = 4000

    def __post_init__(self) -> None:
        if not 0 < self.warmdown_steps <= self.steps:
            raise ValueError(f"warmdown_steps must be in 1..steps ({self.steps}), got {self.warmdown_steps}")


def generation_kwargs(steps: int = INFERENCE_STEPS) -> dict[str, object]:
    """Pipeline call arguments every caller of the demo model needs (see `adapters.tiny`)."""
    return {
        "num_inference_steps": steps,
        "guidance_scale": GUIDANCE_SCALE,
        "height": RESOLUTION,
        "width": RESOLUTION,
        "use_resolution_binning": False,
        "clean_caption": False,
        "max_sequence_length": TINY_MAX_SEQUENCE_LENGTH,
    }


def _log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def _render_batch(
    rng: np.random.Generator, count: int, combos: list[tuple[str, str, str]]
) -> tuple[torch.Tensor, list[world.Scene]]:
    scene_list = [world.sample_scene(rng, *combos[i]) for i in rng.integers(0, len(combos), count)]
    pixels = world.to_array([world.render(scene, RESOLUTION) for scene in scene_list])
    return torch.from_numpy(pixels), scene_list


def _foreground(pixels: torch.Tensor, scenes: list[world.Scene]) -> torch.Tensor:
    """[N, 1, H, W] mask of the pixels that differ from the scene's (exact, unjittered) background."""
    background = torch.tensor([world.BACKGROUNDS[scene.background] for scene in scenes]) / 127.5 - 1.0
    return ((pixels - background[:, :, None, None]).abs().amax(1, keepdim=True) > 0.02).float()


def build_demo_vae(seed: int) -> AutoencoderKL:
    """`adapters.tiny`'s VAE geometry (4 blocks, 8x downsampling, 4 latent channels) with wider
    inner blocks: the 8-8-16-16 channels of the tiny one, trained, turn red into orange and blur
    stars into blobs (the judge read back 61% of shapes and 80% of colours from its reconstructions).

    The log-variance half of `quant_conv` starts near exp(-5) standard deviation: with the tiny KL
    weight below nothing else would shrink the posterior noise, which then blurs every latent.
    """
    torch.manual_seed(seed)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 16, 32, 64),
        layers_per_block=1,
        latent_channels=TINY_LATENT_CHANNELS,
        norm_num_groups=4,
        sample_size=RESOLUTION,
    )
    with torch.no_grad():
        vae.quant_conv.bias[TINY_LATENT_CHANNELS:] = -10.0
    return vae


def train_vae(vae: AutoencoderKL, settings: TrainingSettings) -> None:
    """Fit the VAE as an autoencoder; the KL weight is tiny because only reconstruction matters
    here and the latent's scale is normalised afterwards through `scaling_factor`."""
    rng = np.random.default_rng(settings.seed)
    optimiser = torch.optim.AdamW(vae.parameters(), lr=settings.vae_learning_rate, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimiser, max_lr=settings.vae_learning_rate, total_steps=settings.vae_steps, pct_start=0.05
    )
    vae.train()
    for step in range(settings.vae_steps):
        pixels, scenes = _render_batch(rng, settings.vae_batch_size, VAE_COMBINATIONS)
        posterior = vae.encode(pixels).latent_dist
        reconstruction = vae.decode(posterior.sample()).sample
        squared = (reconstruction - pixels).square()
        mse = squared.mean()
        weight = 1.0 + FOREGROUND_WEIGHT * _foreground(pixels, scenes)
        loss = (weight * squared).mean() + 1e-6 * posterior.kl().mean()
        optimiser.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimiser.step()
        schedule.step()
        if step % 100 == 0 or step == settings.vae_steps - 1:
            _log(f"vae step {step} mse {mse.item():.5f}")
    vae.eval()


@torch.no_grad()
def encode_dataset(vae: AutoencoderKL, settings: TrainingSettings) -> tuple[torch.Tensor, list[str]]:
    """Render and encode the training images once; returns unscaled posterior means and captions."""
    rng = np.random.default_rng(settings.seed + 1)
    means, captions = [], []
    for start in range(0, settings.images, 256):
        pixels, scenes = _render_batch(rng, min(256, settings.images - start), world.training_combinations())
        means.append(vae.encode(pixels).latent_dist.mean)
        captions += [scene.caption for scene in scenes]
    return torch.cat(means), captions


@torch.no_grad()
def encode_captions(pipe: PixArtSigmaPipeline, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    embeds, mask, _, _ = pipe.encode_prompt(
        captions, do_classifier_free_guidance=False, max_sequence_length=TINY_MAX_SEQUENCE_LENGTH
    )
    return embeds, mask


@torch.no_grad()
def zero_init_residual_branches(transformer: PixArtTransformer2DModel) -> None:
    """DiT's adaLN-Zero start: the timestep modulation, every block's gates and the output
    projection at zero, so the untrained transformer is the identity on its tokens and predicts
    zero noise. diffusers starts them random; zeroed, held-out shapes were right in 33 % of images
    after 7 minutes, against 26 %.
    """
    transformer.adaln_single.linear.weight.zero_()
    transformer.adaln_single.linear.bias.zero_()
    for block in transformer.transformer_blocks:
        # Rows of the block's table: shift, scale, gate (attention), then shift, scale, gate (MLP).
        block.scale_shift_table[2].zero_()
        block.scale_shift_table[5].zero_()
    transformer.proj_out.weight.zero_()
    transformer.proj_out.bias.zero_()


def train_transformer(
    pipe: PixArtSigmaPipeline,
    latents: torch.Tensor,
    captions: list[str],
    settings: TrainingSettings,
    on_checkpoint: Callable[[PixArtTransformer2DModel], None],
) -> PixArtTransformer2DModel:
    """DDPM epsilon-prediction training; returns the exponential moving average of the weights,
    which samples markedly better than the last iterate after a short run. `on_checkpoint` gets
    the average every `settings.checkpoint_every` steps, so a long run can be judged as it goes."""
    unique = sorted(set(captions))
    # Index len(unique) is the empty caption that classifier-free guidance uses as its negative.
    embeds, mask = encode_captions(pipe, [*unique, ""])
    caption_ids = torch.tensor([unique.index(c) for c in captions])
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    generator = torch.Generator().manual_seed(settings.seed + 2)
    transformer = pipe.transformer
    zero_init_residual_branches(transformer)
    ema = copy.deepcopy(transformer).requires_grad_(False)
    optimiser = torch.optim.AdamW(transformer.parameters(), lr=settings.learning_rate, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimiser,
        lambda step: min(1.0, (step + 1) / settings.warmup_steps, (settings.steps - step) / settings.warmdown_steps),
    )
    transformer.train()
    running = 0.0
    for step in range(settings.steps):
        picks = torch.randint(0, len(latents), (settings.batch_size,), generator=generator)
        ids = caption_ids[picks].clone()
        ids[torch.rand(settings.batch_size, generator=generator) < CAPTION_DROPOUT] = len(unique)
        clean = latents[picks] * pipe.vae.config.scaling_factor
        noise = torch.randn(clean.shape, generator=generator)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (settings.batch_size,), generator=generator)
        prediction = transformer(
            scheduler.add_noise(clean, noise, timesteps),
            encoder_hidden_states=embeds[ids],
            encoder_attention_mask=mask[ids],
            timestep=timesteps,
            added_cond_kwargs={"resolution": None, "aspect_ratio": None},
        ).sample.chunk(2, 1)[0]
        loss = F.mse_loss(prediction, noise)
        optimiser.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(transformer.parameters(), 1.0)
        optimiser.step()
        schedule.step()
        # The usual warm-up of the decay keeps early averages from clinging to the random init.
        decay = min(settings.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for average, current in zip(ema.parameters(), transformer.parameters(), strict=True):
                average.lerp_(current, 1.0 - decay)
        running = 0.98 * running + 0.02 * loss.item() if step else loss.item()
        if step % 100 == 0 or step == settings.steps - 1:
            _log(f"transformer step {step} loss {running:.4f}")
        if (step + 1) % settings.checkpoint_every == 0 and step + 1 < settings.steps:
            on_checkpoint(ema)
    return ema.eval()


def train(settings: TrainingSettings, output: Path, reuse_vae: bool = False) -> None:
    """Train and save the pipeline to `output`; `reuse_vae` keeps a VAE an earlier run saved there."""
    torch.manual_seed(settings.seed)
    start = time.perf_counter()
    pipe = build_tiny_pipeline(
        settings.seed, num_layers=NUM_LAYERS, num_attention_heads=NUM_HEADS, attention_head_dim=HEAD_DIM
    )
    pipe.vae = build_demo_vae(settings.seed)
    if reuse_vae:
        # Weights only: a loaded config would record this folder's path as `_name_or_path`.
        pipe.vae.load_state_dict(load_file(output / "vae" / "diffusion_pytorch_model.safetensors"))
        pipe.vae.eval()
    else:
        train_vae(pipe.vae, settings)
    means, captions = encode_dataset(pipe.vae, settings)
    pipe.vae.register_to_config(scaling_factor=float(1.0 / means.std()))
    pipe.vae.save_pretrained(output / "vae")
    _log(f"encoded {len(means)} images, scaling factor {pipe.vae.config.scaling_factor:.4f}")

    def checkpoint(transformer: PixArtTransformer2DModel) -> None:
        PixArtSigmaPipeline(**{**pipe.components, "transformer": transformer}).save_pretrained(output)

    pipe.transformer = train_transformer(pipe, means, captions, settings, checkpoint)
    pipe.save_pretrained(output, safe_serialization=True)
    seconds = time.perf_counter() - start
    info = {"settings": asdict(settings), "seconds": round(seconds), "threads": torch.get_num_threads()}
    (output / "training.json").write_text(json.dumps(info, indent=2) + "\n")
    _log(f"saved {output} after {seconds / 60:.1f} min")


def quiet_progress_bars() -> None:
    """Loading a pipeline per benchmark run would otherwise print two progress bars each time."""
    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()


def load_demo_model(folder: Path = DEMO_MODEL) -> PixArtSigmaPipeline:
    pipe = PixArtSigmaPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@dataclass
class Evaluation:
    accuracy: dict[str, float]
    all_correct: float
    images: int
    seconds_per_four_images: float


def generate(
    pipe: PixArtSigmaPipeline, prompts: list[str], seed: int, steps: int = INFERENCE_STEPS
) -> list[Image.Image]:
    generator = torch.Generator().manual_seed(seed)
    return pipe(prompts, generator=generator, **generation_kwargs(steps)).images


def evaluate(
    pipe: PixArtSigmaPipeline,
    combos: list[tuple[str, str, str]],
    images_per_combo: int,
    seed: int = 0,
    steps: int = INFERENCE_STEPS,
) -> tuple[Evaluation, list[Image.Image]]:
    """Generate `images_per_combo` images per (shape, colour, background) and judge them."""
    judge = judge_module.load_judge()
    prompts = [world.caption(*combo) for combo in combos for _ in range(images_per_combo)]
    images: list[Image.Image] = []
    for start in range(0, len(prompts), 16):
        images += generate(pipe, prompts[start : start + 16], seed + start, steps)
    verdict = judge_module.judge_images(judge, images)
    expected = {
        name: [combo[position] for combo in combos for _ in range(images_per_combo)]
        for position, name in enumerate(("shape", "colour", "background"))
    }
    hits = {name: np.array(verdict.labels[name]) == np.array(expected[name]) for name in expected}
    timing = time_four_images(pipe, world.caption(*combos[0]), steps)
    evaluation = Evaluation(
        accuracy={name: float(hit.mean()) for name, hit in hits.items()},
        all_correct=float(np.logical_and.reduce(list(hits.values())).mean()),
        images=len(images),
        seconds_per_four_images=timing,
    )
    return evaluation, images


def time_four_images(pipe: PixArtSigmaPipeline, prompt: str, steps: int = INFERENCE_STEPS) -> float:
    """Best of three wall-clock times for one call drawing four images (the first call warms up)."""
    generate(pipe, [prompt] * 4, 0, steps)
    times = []
    for _ in range(3):
        start = time.perf_counter()
        generate(pipe, [prompt] * 4, 0, steps)
        times.append(time.perf_counter() - start)
    return min(times)


def grid(images: list[Image.Image], columns: int) -> Image.Image:
    width, height = images[0].size
    rows = -(-len(images) // columns)
    sheet = Image.new("RGB", (columns * width, rows * height), "white")
    for i, image in enumerate(images):
        sheet.paste(image, ((i % columns) * width, (i // columns) * height))
    return sheet


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=DEMO_MODEL)
    parser.add_argument("--evaluate", type=Path, help="evaluate this saved model instead of training")
    parser.add_argument("--images-per-combo", type=int, default=8)
    parser.add_argument("--samples", type=Path, default=RESULTS / "demo_model_held_out.png")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reuse-vae", action="store_true", help="keep the VAE saved in --output")
    defaults = TrainingSettings()
    for name, value in asdict(defaults).items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=value)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    quiet_progress_bars()
    if args.evaluate:
        pipe = load_demo_model(args.evaluate)
        evaluation, images = evaluate(pipe, world.held_out_combinations(), args.images_per_combo)
        print(json.dumps(asdict(evaluation), indent=2))
        grid(images, args.images_per_combo).save(args.samples)
        return
    settings = TrainingSettings(**{name: getattr(args, name) for name in asdict(defaults)})
    train(settings, args.output, args.reuse_vae)


if __name__ == "__main__":
    main()
