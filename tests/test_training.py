"""Fine-tuning a concept on the tiny pipeline: ours and the PEFT baselines through one loop."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import PixArtSigmaPipeline
from PIL import Image

from adapters import (
    TINY_MAX_SEQUENCE_LENGTH,
    AdapterHost,
    SampleRoute,
    SparseDictionaryAdapter,
    SparseDictionaryConfig,
    TrainingCancelled,
    TrainingConfig,
    build_tiny_pipeline,
    train_adapter,
    train_baseline,
)

PROMPT = "a photo of sks"


def concept_images(count: int = 4) -> list[Image.Image]:
    """A red, noisy square patch: a concept far from what the random tiny model draws."""
    images = []
    for index in range(count):
        rng = np.random.default_rng(index)
        array = np.full((64, 64, 3), (30, 30, 30), dtype=np.float64)
        array[16:48, 16:48] = (220, 30, 30)
        array += rng.normal(0, 10, array.shape)
        images.append(Image.fromarray(array.clip(0, 255).astype(np.uint8)))
    return images


def training_config(steps: int, **overrides: object) -> TrainingConfig:
    values = {"steps": steps, "learning_rate": 1e-2, "max_sequence_length": TINY_MAX_SEQUENCE_LENGTH}
    values.update(overrides)
    return TrainingConfig(**values)


def generate(pipeline: PixArtSigmaPipeline, host: AdapterHost, route: SampleRoute | None) -> np.ndarray:
    kwargs = {
        "num_inference_steps": 3,
        "use_resolution_binning": False,
        "max_sequence_length": TINY_MAX_SEQUENCE_LENGTH,
        "clean_caption": False,
        "output_type": "np",
        "generator": torch.Generator().manual_seed(0),
    }
    if route is None:
        return pipeline(PROMPT, **kwargs).images
    with host.route([route]):
        return pipeline(PROMPT, **kwargs).images


def test_training_lowers_loss_and_changes_images_but_not_the_base() -> None:
    pipeline = build_tiny_pipeline(seed=0)
    host = AdapterHost(pipeline.transformer)
    base_weights = {k: v.clone() for k, v in pipeline.transformer.state_dict().items()}
    base_before = generate(pipeline, host, None)
    progress: list[tuple[int, int, float]] = []

    result = train_adapter(
        pipeline,
        host,
        concept_images(),
        PROMPT,
        SparseDictionaryConfig(num_atoms=16, density=0.25),
        training_config(60),
        on_progress=lambda step, total, loss: progress.append((step, total, loss)),
    )

    assert np.mean(result.losses[-15:]) < 0.9 * np.mean(result.losses[:15])
    assert [p[0] for p in progress] == list(range(1, 61)) and all(p[1] == 60 for p in progress)
    assert host.names() == [], "the adapter is resident only while it trains"
    assert set(result.adapter.importance) == set(result.adapter.blocks)
    assert all(bool((v >= 0).all()) and float(v.sum()) > 0 for v in result.adapter.importance.values())
    for key, value in pipeline.transformer.state_dict().items():
        assert torch.equal(value, base_weights[key]), f"base weight {key} changed"

    host.add("concept", result.adapter)
    adapted = generate(pipeline, host, SampleRoute("concept"))
    sparser = generate(pipeline, host, SampleRoute("concept", density=1 / 16))
    base_after = generate(pipeline, host, None)
    assert np.array_equal(base_before, base_after)
    assert np.abs(adapted - base_after).mean() > 1e-2
    assert np.abs(adapted - sparser).mean() > 1e-3


def test_calibrated_initialisation_gives_unit_variance_coefficients() -> None:
    from adapters.training import encode_concept, measure_input_rms
    from benchmarks.train_demo_model import load_demo_model

    # The demo model, not a random one: its trained, modulated attention input is far from unit-RMS.
    pipeline = load_demo_model()
    data = encode_concept(pipeline, concept_images(), PROMPT, training_config(1), torch.Generator().manual_seed(0))
    blocks = list(range(len(pipeline.transformer.transformer_blocks)))
    inputs: dict[int, list[torch.Tensor]] = {block: [] for block in blocks}
    hooks = [
        pipeline.transformer.transformer_blocks[block].attn1.register_forward_pre_hook(
            lambda _module, args, block=block: inputs[block].append(args[0])
        )
        for block in blocks
    ]
    rms = measure_input_rms(pipeline.transformer, blocks, data)
    for hook in hooks:
        hook.remove()
    adapter_config = SparseDictionaryConfig(num_atoms=32)
    plain = SparseDictionaryAdapter.create(adapter_config, pipeline.transformer, seed=0)
    calibrated = SparseDictionaryAdapter.create(adapter_config, pipeline.transformer, seed=0, input_rms=rms)
    for block in blocks:
        seen = torch.cat(inputs[block])
        assert rms[block] < 0.5, "the demo model's attention input should be far from unit-RMS"

        def coefficient_rms(adapter: SparseDictionaryAdapter, block: int = block, seen: torch.Tensor = seen) -> float:
            return (seen @ adapter.layer(block).coefficient_proj).square().mean().sqrt().item()  # type: ignore[union-attr]

        assert 0.8 < coefficient_rms(calibrated) < 1.25, (block, rms[block])
        assert coefficient_rms(plain) < 0.5


def test_augmented_copies_are_encoded_beside_the_originals_with_their_captions() -> None:
    from adapters.training import encode_concept

    pipeline = build_tiny_pipeline(seed=0)
    images = concept_images(2)
    captions = ["a photo of sks on grey", "a photo of sks in the dark"]

    def encode(augmentations: int, seed: int = 0) -> torch.Tensor:
        config = training_config(1, augmentations=augmentations)
        data = encode_concept(pipeline, images, captions, config, torch.Generator().manual_seed(seed))
        assert data.prompt_embeds.shape[0] == data.latents.shape[0] == 2 * (1 + augmentations)
        # Captions follow their image: every copy of image j is trained on image j's caption.
        for copy in range(1, 1 + augmentations):
            assert torch.equal(data.prompt_embeds[2 * copy : 2 * copy + 2], data.prompt_embeds[0:2])
        return data.latents

    encode(0)
    augmented = encode(3)
    assert torch.equal(augmented, encode(3)), "augmentation is seeded"
    assert (augmented[2:] - augmented[:2].repeat(3, 1, 1, 1)).abs().amax() > 0.1, "copies differ from originals"
    with pytest.raises(ValueError, match="augmentations"):
        training_config(1, augmentations=17).validate()
    for shift in (0.0, 0.6):
        with pytest.raises(ValueError, match="augmentation_shift"):
            training_config(1, augmentations=1, augmentation_shift=shift).validate()


def test_training_is_deterministic_for_a_seed() -> None:
    pipeline = build_tiny_pipeline(seed=0)
    host = AdapterHost(pipeline.transformer)
    config = SparseDictionaryConfig(num_atoms=16, density=0.25)
    first = train_adapter(pipeline, host, concept_images(2), PROMPT, config, training_config(4, seed=3))
    second = train_adapter(pipeline, host, concept_images(2), PROMPT, config, training_config(4, seed=3))
    other = train_adapter(pipeline, host, concept_images(2), PROMPT, config, training_config(4, seed=4))
    assert first.losses == second.losses
    for a, b in zip(first.adapter.parameters(), second.adapter.parameters(), strict=True):
        assert torch.equal(a, b)
    assert first.losses != other.losses


def test_training_stops_between_steps_when_asked() -> None:
    pipeline = build_tiny_pipeline(seed=0)
    host = AdapterHost(pipeline.transformer)
    seen: list[int] = []
    with pytest.raises(TrainingCancelled) as cancelled:
        train_adapter(
            pipeline,
            host,
            concept_images(2),
            PROMPT,
            SparseDictionaryConfig(num_atoms=16),
            training_config(50),
            on_progress=lambda step, total, loss: seen.append(step),
            should_stop=lambda: len(seen) >= 3,
        )
    assert cancelled.value.step == 3 and seen == [1, 2, 3]
    assert host.names() == []


@pytest.mark.parametrize("method", ["lora", "dora", "oft"])
def test_peft_baselines_train_through_the_same_loop(method: str) -> None:
    pipeline = build_tiny_pipeline(seed=0)
    base_weights = {k: v.clone() for k, v in pipeline.transformer.state_dict().items()}
    result = train_baseline(pipeline, concept_images(2), PROMPT, method, training_config(8, learning_rate=1e-3))
    assert len(result.losses) == 8 and all(np.isfinite(result.losses))
    changed = [
        name
        for name, value in result.model.named_parameters()
        if name.replace("base_model.model.", "") in base_weights
        and not torch.equal(value, base_weights[name.replace("base_model.model.", "")])
    ]
    assert changed == [], f"{method} changed frozen weights: {changed[:3]}"
    adapter_names = [n for n, _ in result.model.named_parameters() if "lora_" in n or "oft_" in n]
    assert adapter_names, f"{method} injected no adapter parameters"


def test_bad_training_configs_are_rejected() -> None:
    for config, message in [
        (TrainingConfig(steps=0), "steps"),
        (TrainingConfig(learning_rate=0), "learning_rate"),
        (TrainingConfig(resolution=4), "resolution"),
    ]:
        with pytest.raises(ValueError, match=message):
            config.validate()


def test_gradient_checkpointing_and_mixed_precision_run_the_same_loop() -> None:
    pipeline = build_tiny_pipeline(seed=0)
    host = AdapterHost(pipeline.transformer)
    config = SparseDictionaryConfig(num_atoms=16, density=0.25)
    plain = train_adapter(pipeline, host, concept_images(2), PROMPT, config, training_config(3))
    checkpointed = train_adapter(
        pipeline, host, concept_images(2), PROMPT, config, training_config(3, gradient_checkpointing=True)
    )
    assert np.allclose(plain.losses, checkpointed.losses, rtol=1e-5)
    assert not pipeline.transformer.is_gradient_checkpointing
    bf16 = train_adapter(pipeline, host, concept_images(2), PROMPT, config, training_config(3, mixed_precision="bf16"))
    assert np.allclose(plain.losses, bf16.losses, rtol=0.1)
    assert all(p.dtype == torch.float32 for p in bf16.adapter.parameters())


def test_prior_preservation_draws_the_base_and_keeps_the_adapter_off_its_prompts() -> None:
    from adapters.training import ConceptData, _predict_noise, draw_prior
    from benchmarks.concept_eval import concept_images
    from benchmarks.train_demo_model import load_demo_model

    # The demo model, not a random one: there an adapter learns a concept in a few steps and moves
    # the prediction for other prompts with it (0.03 mean squared; 0.002 with the prior's loss).
    pipeline = load_demo_model()
    prompt, prior_prompt = "a red sks on a black background", "a red circle on a black background"

    def config(**overrides: object) -> TrainingConfig:
        return TrainingConfig(steps=150, learning_rate=3e-3, batch_size=4, max_sequence_length=16, **overrides)

    preserving = config(prior_prompts=(prior_prompt,), prior_images_per_prompt=4, prior_loss_weight=10.0)
    prior = draw_prior(pipeline, preserving, seed=5)
    assert prior is not None and draw_prior(pipeline, config(), seed=5) is None
    drawn = pipeline(
        [prior_prompt] * 4,
        negative_prompt="",
        num_inference_steps=preserving.prior_inference_steps,
        guidance_scale=preserving.prior_guidance_scale,
        generator=torch.Generator().manual_seed(5),
        output_type="latent",
        use_resolution_binning=False,
        max_sequence_length=16,
        clean_caption=False,
    ).images
    assert torch.equal(prior.latents, drawn.float()), "the prior is the base model's own images of its prompt"
    draws = preserving.prior_noise_draws
    assert prior.noisy.shape[0] == prior.targets.shape[0] == prior.prompt_embeds.shape[0] == 4 * draws
    images = ConceptData(prior.latents, prior.prompt_embeds[:4], prior.prompt_attention_mask[:4])
    noise = torch.randn(prior.latents.shape, generator=torch.Generator().manual_seed(1))

    def drift_on_prior(training: TrainingConfig) -> float:
        """How far the trained adapter moves the base's noise prediction on the prior's images
        and prompt, at fresh noisings."""
        host = AdapterHost(pipeline.transformer)
        adapter_config = SparseDictionaryConfig(num_atoms=64, density=0.125)
        result = train_adapter(pipeline, host, concept_images(0, 4, ("red", "black")), prompt, adapter_config, training)
        host.add("concept", result.adapter)
        drift = []
        for timestep in (100, 500, 900):
            t = torch.full((4,), timestep)
            noisy = pipeline.scheduler.add_noise(prior.latents, noise, t)
            with torch.no_grad():
                base = _predict_noise(pipeline.transformer, noisy, t, images, torch.arange(4))
                with host.route([SampleRoute("concept")] * 4):
                    adapted = _predict_noise(pipeline.transformer, noisy, t, images, torch.arange(4))
            drift.append((adapted - base).square().mean().item())
        return float(np.mean(drift))

    without, with_prior = drift_on_prior(config()), drift_on_prior(preserving)
    assert with_prior < 0.25 * without, (with_prior, without)
    with pytest.raises(ValueError, match="prior_images_per_prompt"):
        config(prior_prompts=("x",), prior_images_per_prompt=0).validate()
