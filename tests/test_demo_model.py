import json

import pytest
import torch

from adapters.tiny import TINY_LATENT_CHANNELS, TINY_LATENT_SIZE, TINY_TEXT_DIM, build_tiny_transformer
from benchmarks import judge as judge_module
from benchmarks import world
from benchmarks.train_demo_model import (
    DEMO_MODEL,
    TrainingSettings,
    generate,
    load_demo_model,
    zero_init_residual_branches,
)


def test_demo_model_is_a_small_diffusers_pixart_sigma_folder() -> None:
    index = json.loads((DEMO_MODEL / "model_index.json").read_text())
    assert index["_class_name"] == "PixArtSigmaPipeline"
    size = sum(path.stat().st_size for path in DEMO_MODEL.rglob("*") if path.is_file())
    assert size <= 25 * 2**20


def test_demo_model_draws_the_prompted_shape_colour_and_background() -> None:
    pipe = load_demo_model()
    # Held-out combinations: the model never saw these captions, so this also checks composition.
    combos = world.held_out_combinations()
    images = generate(pipe, [world.caption(*combo) for combo in combos], seed=0, steps=10)
    assert images[0].size == (64, 64)
    verdict = judge_module.judge_images(judge_module.load_judge(), images)
    for position, attribute in enumerate(("shape", "colour", "background")):
        hits = sum(label == combo[position] for label, combo in zip(verdict.labels[attribute], combos, strict=True))
        assert hits >= 0.7 * len(combos), (attribute, verdict.labels[attribute], combos)


def test_zero_initialised_transformer_predicts_zero_noise_until_trained() -> None:
    transformer = build_tiny_transformer(seed=0)
    zero_init_residual_branches(transformer)
    latents = torch.randn(2, TINY_LATENT_CHANNELS, TINY_LATENT_SIZE, TINY_LATENT_SIZE)
    text = torch.randn(2, 5, TINY_TEXT_DIM)
    output = transformer(
        latents,
        encoder_hidden_states=text,
        timestep=torch.tensor([10, 900]),
        added_cond_kwargs={"resolution": None, "aspect_ratio": None},
    ).sample
    assert output.shape == (2, 2 * TINY_LATENT_CHANNELS, TINY_LATENT_SIZE, TINY_LATENT_SIZE)
    assert not output.any()
    # Only the output projection gets a gradient on the first step; the gates follow from the next.
    output.sub(latents.repeat(1, 2, 1, 1)).square().mean().backward()
    assert transformer.proj_out.weight.grad.abs().sum() > 0


def test_training_settings_reject_a_warmdown_longer_than_the_run() -> None:
    with pytest.raises(ValueError, match="warmdown_steps"):
        TrainingSettings(steps=1000, warmdown_steps=2000)
