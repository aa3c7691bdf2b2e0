"""The tiny offline PixArt-Σ pipeline: deterministic, saves/loads in diffusers format, generates."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import DDPMScheduler, PixArtSigmaPipeline

from adapters.tiny import (
    TINY_IMAGE_SIZE,
    TINY_LATENT_CHANNELS,
    TINY_LATENT_SIZE,
    TINY_MAX_SEQUENCE_LENGTH,
    build_tiny_pipeline,
    build_tiny_tokenizer,
    save_tiny_pipeline,
    tiny_image_size,
)

PROMPTS = [
    "a photo of a red circle on a white background",
    "a photo of sks dog",
    "A Teal Zebra, 3 times!",  # outside the corpus: must fall back to characters, not <unk>
    "",
]


def _state_dicts_equal(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def _generate(pipe: PixArtSigmaPipeline, prompt: str, **kwargs: object) -> object:
    return pipe(
        prompt,
        num_inference_steps=2,
        use_resolution_binning=False,
        max_sequence_length=TINY_MAX_SEQUENCE_LENGTH,
        clean_caption=False,
        generator=torch.Generator().manual_seed(0),
        **kwargs,
    ).images


@pytest.fixture(scope="module")
def pipe() -> PixArtSigmaPipeline:
    return build_tiny_pipeline(seed=0)


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_pipeline(tmp_path_factory.mktemp("tiny-pixart"), seed=0)


@pytest.fixture(scope="module")
def loaded(saved: Path) -> PixArtSigmaPipeline:
    pipe = PixArtSigmaPipeline.from_pretrained(saved)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_same_seed_same_weights_and_tokenizer(pipe: PixArtSigmaPipeline) -> None:
    again = build_tiny_pipeline(seed=0)
    for name in ("transformer", "text_encoder", "vae"):
        assert _state_dicts_equal(getattr(pipe, name), getattr(again, name)), name
    assert pipe.tokenizer.backend_tokenizer.to_str() == again.tokenizer.backend_tokenizer.to_str()


def test_other_seed_other_weights(pipe: PixArtSigmaPipeline) -> None:
    other = build_tiny_pipeline(seed=1)
    assert not _state_dicts_equal(pipe.transformer, other.transformer)
    # The vocabulary is part of the "architecture", not of the random draw.
    assert pipe.tokenizer.get_vocab() == other.tokenizer.get_vocab()


def test_building_leaves_global_rng_alone() -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build_tiny_pipeline(seed=0)
    assert torch.equal(torch.rand(3), expected)


def test_shape_keywords_only_touch_the_transformer(pipe: PixArtSigmaPipeline) -> None:
    wide = build_tiny_pipeline(seed=0, num_layers=1, num_attention_heads=2, attention_head_dim=16, sample_size=4)
    cfg = wide.transformer.config
    assert (cfg.num_layers, cfg.num_attention_heads, cfg.attention_head_dim) == (1, 2, 16)
    assert cfg.cross_attention_dim == 32 and cfg.sample_size == 4
    assert _state_dicts_equal(pipe.text_encoder, wide.text_encoder)
    assert _state_dicts_equal(pipe.vae, wide.vae)
    assert tiny_image_size(4) == 32


def test_default_geometry(pipe: PixArtSigmaPipeline) -> None:
    assert pipe.vae_scale_factor * TINY_LATENT_SIZE == TINY_IMAGE_SIZE == 64
    cfg = pipe.transformer.config
    assert cfg.num_attention_heads * cfg.attention_head_dim == cfg.cross_attention_dim
    assert cfg.caption_channels == pipe.text_encoder.config.d_model
    assert cfg.out_channels == 2 * TINY_LATENT_CHANNELS
    assert pipe.text_encoder.config.vocab_size == len(pipe.tokenizer)


def test_tokenizer_appends_eos_and_pads() -> None:
    tok = build_tiny_tokenizer()
    assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2)
    enc = tok(PROMPTS[0], padding="max_length", max_length=16, truncation=True)
    n = sum(enc.attention_mask)
    # One token per corpus word, then </s>, then <pad> up to max_length.
    assert n == len(PROMPTS[0].split()) + 1
    assert enc.input_ids[n - 1] == tok.eos_token_id
    assert enc.input_ids[n:] == [tok.pad_token_id] * (16 - n)
    assert tok.convert_ids_to_tokens(enc.input_ids[:3]) == ["▁a", "▁photo", "▁of"]
    assert "▁sks" in tok.get_vocab()
    for prompt in PROMPTS:
        ids = tok(prompt).input_ids
        assert ids[-1] == tok.eos_token_id and tok.unk_token_id not in ids
        assert tok.decode(ids, skip_special_tokens=True) == prompt


def test_saved_pipeline_loads_like_real_weights(
    pipe: PixArtSigmaPipeline, loaded: PixArtSigmaPipeline, saved: Path
) -> None:
    assert (saved / "model_index.json").is_file()
    for name in ("transformer", "text_encoder", "vae"):
        assert _state_dicts_equal(getattr(pipe, name), getattr(loaded, name)), name
    # transformers' T5Tokenizer rebuilds the backend on load; encodings must not change.
    for prompt in PROMPTS:
        assert loaded.tokenizer(prompt).input_ids == pipe.tokenizer(prompt).input_ids, prompt
    # Training code derives its noise scheduler from the saved inference scheduler's config.
    ddpm = DDPMScheduler.from_config(loaded.scheduler.config)
    assert ddpm.config.num_train_timesteps == 1000 and ddpm.config.prediction_type == "epsilon"


def test_generates_native_size_image(loaded: PixArtSigmaPipeline) -> None:
    (image,) = _generate(loaded, PROMPTS[0])
    assert image.size == (TINY_IMAGE_SIZE, TINY_IMAGE_SIZE)
    latents = _generate(loaded, PROMPTS[1], output_type="latent")
    assert latents.shape == (1, TINY_LATENT_CHANNELS, TINY_LATENT_SIZE, TINY_LATENT_SIZE)
    assert torch.isfinite(latents).all()


def test_generation_is_reproducible(loaded: PixArtSigmaPipeline) -> None:
    a = _generate(loaded, PROMPTS[0], output_type="pt")
    b = _generate(loaded, PROMPTS[0], output_type="pt")
    c = _generate(loaded, PROMPTS[1], output_type="pt")
    assert torch.equal(a, b)
    assert not torch.equal(a, c)  # the prompt reaches the image through cross-attention
