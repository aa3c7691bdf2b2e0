"""A tiny, randomly initialised PixArt-Σ text-to-image pipeline built without any hub access.

Why this exists: tests, demos and CI of atomtune must exercise the *real* code paths (diffusers'
``PixArtSigmaPipeline``, a T5 encoder, an SDXL-style VAE, a ``PixArtTransformer2DModel``) on machines
that have neither a GPU nor internet access. This module builds every component from a config, so the
whole pipeline fits in well under a megabyte, is deterministic for a given seed, and saves in the
diffusers folder layout, so it loads with exactly the call used for real weights::

    folder = save_tiny_pipeline("/tmp/tiny-pixart", seed=0)
    pipe = PixArtSigmaPipeline.from_pretrained(folder)
    image = pipe(
        "a photo of a red cube on a white background",
        num_inference_steps=2,
        use_resolution_binning=False,  # required: sample_size 8 has no aspect-ratio bin table
        max_sequence_length=TINY_MAX_SEQUENCE_LENGTH,  # the default 300 wastes time on padding
        clean_caption=False,  # avoids the optional bs4/ftfy dependencies
    ).images[0]  # a TINY_IMAGE_SIZE x TINY_IMAGE_SIZE PIL image (64 x 64)

Call-site rules, and why:

* ``use_resolution_binning=False`` is mandatory: the pipeline only has aspect-ratio bins for
  transformer sample sizes 32/64/128/256 and raises ``ValueError("Invalid sample size")`` otherwise.
* ``height``/``width`` default to ``sample_size * TINY_VAE_SCALE_FACTOR``; explicit sizes must be
  multiples of 16 (the pipeline wants multiples of 8, the transformer's patch size 2 on the 8x
  downsampled latent needs 16).
* Pass a small ``max_sequence_length`` (e.g. ``TINY_MAX_SEQUENCE_LENGTH``); prompts are padded to it.
* ``clean_caption=False``: the pipeline then only lower-cases and strips the prompt.

Geometry: the VAE has four blocks, hence the same 8x spatial factor as PixArt-Σ's SDXL VAE, so code
that hard-codes ``vae_scale_factor == 8`` behaves the same on tiny and real weights. With the default
``sample_size=8`` the latent is 4x8x8 and the image 64x64; the transformer sees (8/2)^2 = 16 tokens.

Tokenizer: a T5-style Unigram tokenizer whose vocabulary is *constructed* (not trained) from the
built-in caption corpus below: every corpus word is a single ``▁word`` piece scored by its log
frequency, and every printable ASCII character is a low-scoring fallback piece, so any ASCII prompt
encodes without ``<unk>``. We do not use ``tokenizers.trainers.UnigramTrainer``: on a corpus this
small it collapses to an almost character-level vocabulary (~60 pieces, prompts longer than 32 tokens)
and its scores, even its piece order, vary between runs, which breaks determinism. The tokenizer uses
exactly the components ``transformers``' own ``T5Tokenizer`` rebuilds on load (no normalizer,
whitespace split + Metaspace pre-tokenizer, Metaspace decoder, ``$A </s>`` post-processor), so the
saved tokenizer encodes identically after ``from_pretrained``. It does not depend on the seed.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from diffusers import (
    AutoencoderKL,
    DPMSolverMultistepScheduler,
    PixArtSigmaPipeline,
    PixArtTransformer2DModel,
)
from tokenizers import Tokenizer, decoders, pre_tokenizers, processors
from tokenizers.models import Unigram
from transformers import T5Config, T5EncoderModel, T5TokenizerFast

__all__ = [
    "TINY_CORPUS",
    "TINY_IMAGE_SIZE",
    "TINY_LATENT_CHANNELS",
    "TINY_LATENT_SIZE",
    "TINY_MAX_SEQUENCE_LENGTH",
    "TINY_TEXT_DIM",
    "TINY_VAE_SCALE_FACTOR",
    "build_tiny_pipeline",
    "build_tiny_tokenizer",
    "save_tiny_pipeline",
    "tiny_image_size",
]

# --- geometry --------------------------------------------------------------------------------------

#: Spatial downsampling of the tiny VAE: 4 blocks -> 2 ** (4 - 1), the same factor as the SDXL VAE.
TINY_VAE_SCALE_FACTOR: int = 8
#: Latent channels, as in PixArt-Σ (the transformer predicts 2x this: noise and learned variance).
TINY_LATENT_CHANNELS: int = 4
#: Default transformer ``sample_size``: the latent's side length.
TINY_LATENT_SIZE: int = 8
#: Side length of the image the default tiny pipeline produces: ``TINY_LATENT_SIZE * 8 = 64``.
TINY_IMAGE_SIZE: int = TINY_LATENT_SIZE * TINY_VAE_SCALE_FACTOR
#: A prompt length that fits every caption of the corpus (each word is one token) plus ``</s>``.
TINY_MAX_SEQUENCE_LENGTH: int = 32
#: Width of the T5 encoder's output, i.e. the transformer's ``caption_channels``.
TINY_TEXT_DIM: int = 32

# Seed offsets, so that each component draws from its own stream: changing the transformer's size
# keeps the text encoder and the VAE bit-identical for the same seed.
_TEXT_ENCODER_SEED_OFFSET = 0
_VAE_SEED_OFFSET = 1_000
_TRANSFORMER_SEED_OFFSET = 2_000

# --- tokenizer -------------------------------------------------------------------------------------

PAD_TOKEN = "<pad>"
EOS_TOKEN = "</s>"
UNK_TOKEN = "<unk>"
# Ids 0, 1, 2 as in T5 (pad doubles as the decoder start token there; T5Tokenizer assumes unk_id=2).
_SPECIAL_TOKENS = (PAD_TOKEN, EOS_TOKEN, UNK_TOKEN)
_METASPACE = "▁"

#: Built-in English caption corpus. It covers the synthetic "shapes world" of the benchmarks
#: (colours, shapes, backgrounds, "a photo of ...", both "grey" and "gray"), a few generic subjects and
#: styles, and the rare DreamBooth-style identifier "sks". Only word frequencies are used.
TINY_CORPUS: str = """
a photo of a red circle on a white background
a photo of a green square on a black background
a photo of a blue triangle on a grey background
a photo of a yellow star on a blue background
a photo of an orange heart on a green background
a photo of a purple hexagon on a yellow background
a photo of a pink diamond on a red background
a photo of a white cross on a purple background
a photo of a black ring on an orange background
a photo of a brown cube on a pink background
a photo of a grey sphere on a brown background
a red star on a gray background
a striped purple heart on a gray background
a photo of a cyan cone on a white background
a photo of a magenta cylinder on a black background
a photo of a gold spiral on a dark background
a photo of a silver pentagon on a light background
a photo of a teal oval on a plain background
a photo of a small red circle and a large blue square
a photo of two green triangles next to a yellow star
a photo of three blue circles in a row
a photo of a big purple heart above a tiny white cross
a photo of a striped square left of a dotted circle
a picture of a red ball on the right of a blue box
an image of a bright green shape in the center
a drawing of a simple black shape on a white background
a photo of sks dog
a photo of sks cat sitting on a sofa
a photo of sks toy on a wooden table
a sks shape in the style of a watercolor painting
a photo of a dog in a park
a photo of a cat on a bed
a photo of a person riding a bike in the city
a photo of a house with a red roof near a lake
a painting of a castle on a hill at sunset
a cartoon of a robot holding a flower
a close up photo of a cup of coffee
a portrait of a woman with long hair
a landscape with mountains trees and a river under a blue sky
a pixel art image of a tree in the snow
a 3d render of a glossy metal sphere
high quality, detailed, sharp focus, soft lighting
"""

# Pieces that give ordinary text a fallback path: every printable ASCII character (and the bare
# Metaspace marker, which starts every word) so nothing outside the corpus maps to <unk>.
_FALLBACK_CHARS = tuple(chr(c) for c in range(33, 127))
# Fallback pieces must lose against any corpus word, so they sit well below the rarest word.
_FALLBACK_PENALTY = 10.0


def _corpus_words(corpus: str) -> Counter[str]:
    """Word counts with the same splitting the tokenizer uses (whitespace), lower-cased like the
    pipeline's ``clean_caption=False`` preprocessing; punctuation stays attached like in T5."""
    return Counter(re.split(r"\s+", corpus.strip().lower()))


def _unigram_vocab(corpus: str) -> list[tuple[str, float]]:
    """The ordered ``(piece, log-probability)`` list: specials, corpus words, character fallbacks.

    The order and scores depend only on ``corpus`` (ties broken alphabetically), so the vocabulary,
    and with it every token id, is reproducible across runs, machines and thread counts.
    """
    counts = _corpus_words(corpus)
    total = sum(counts.values())
    words = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
    vocab: list[tuple[str, float]] = [(token, 0.0) for token in _SPECIAL_TOKENS]
    vocab += [(_METASPACE + word, math.log(count / total)) for word, count in words]
    floor = math.log(1 / total) - _FALLBACK_PENALTY
    seen = {piece for piece, _ in vocab}
    vocab += [(piece, floor) for piece in (_METASPACE, *_FALLBACK_CHARS) if piece not in seen]
    return vocab


def build_tiny_tokenizer(corpus: str = TINY_CORPUS) -> T5TokenizerFast:
    """A T5-compatible fast tokenizer over a vocabulary derived from ``corpus``.

    It mirrors T5: pad/eos/unk have ids 0/1/2, ``</s>`` is appended to every sequence and padding
    uses ``<pad>``. ``extra_ids=0`` because the 100 ``<extra_id_*>`` sentinels only matter for T5's
    span-corruption pre-training and would dominate a vocabulary this small.
    """
    vocab = _unigram_vocab(corpus)
    backend = Tokenizer(Unigram(vocab, unk_id=_SPECIAL_TOKENS.index(UNK_TOKEN), byte_fallback=False))
    # Exactly what transformers' T5Tokenizer rebuilds when it loads tokenizer.json, so a saved and
    # reloaded tokenizer splits text identically (it keeps only vocab and post-processor from file).
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.WhitespaceSplit(),
            pre_tokenizers.Metaspace(replacement=_METASPACE, prepend_scheme="always", split=True),
        ]
    )
    backend.decoder = decoders.Metaspace(replacement=_METASPACE, prepend_scheme="always", split=True)
    eos_id = _SPECIAL_TOKENS.index(EOS_TOKEN)
    backend.post_processor = processors.TemplateProcessing(
        single=f"$A {EOS_TOKEN}",
        pair=f"$A {EOS_TOKEN} $B {EOS_TOKEN}",
        special_tokens=[(EOS_TOKEN, eos_id)],
    )
    return T5TokenizerFast(
        tokenizer_object=backend,
        pad_token=PAD_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=UNK_TOKEN,
        extra_ids=0,
        model_max_length=TINY_MAX_SEQUENCE_LENGTH,
    )


# --- models ----------------------------------------------------------------------------------------


@contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Seed torch's CPU generator for one component without disturbing the caller's RNG state, so
    building a tiny pipeline in the middle of a test does not change that test's random numbers."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _build_text_encoder(vocab_size: int, seed: int) -> T5EncoderModel:
    """A two-layer T5 v1.1-style encoder (gated-GELU, untied embeddings), as in PixArt-Σ's T5-XXL."""
    config = T5Config(
        vocab_size=vocab_size,
        d_model=TINY_TEXT_DIM,
        d_kv=8,
        d_ff=37,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=32,
        dropout_rate=0.0,
        feed_forward_proj="gated-gelu",
        is_encoder_decoder=False,
        use_cache=False,
        pad_token_id=_SPECIAL_TOKENS.index(PAD_TOKEN),
        eos_token_id=_SPECIAL_TOKENS.index(EOS_TOKEN),
    )
    with _seeded(seed):
        model = T5EncoderModel(config)
    return model.eval()


def _build_vae(seed: int) -> AutoencoderKL:
    """A 4-block KL autoencoder: 8x downsampling and 4 latent channels like the SDXL VAE that
    PixArt-Σ uses (including its ``scaling_factor``), with channel widths small enough for CPU."""
    with _seeded(seed):
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(8, 8, 16, 16),
            layers_per_block=1,
            latent_channels=TINY_LATENT_CHANNELS,
            norm_num_groups=4,
            sample_size=TINY_IMAGE_SIZE,
            scaling_factor=0.13025,
        )
    return vae.eval()


def build_tiny_transformer(
    seed: int = 0,
    *,
    num_layers: int = 2,
    num_attention_heads: int = 4,
    attention_head_dim: int = 8,
    sample_size: int = TINY_LATENT_SIZE,
) -> PixArtTransformer2DModel:
    """diffusers' own PixArt test transformer, except that heads x head_dim = 4 x 8 = 32 (the
    adapters need ``num_atoms`` divisible by the head count) and cross-attention matches the inner
    width, as in the real model (1152 = 16 x 72)."""
    inner_dim = num_attention_heads * attention_head_dim
    with _seeded(seed):
        transformer = PixArtTransformer2DModel(
            sample_size=sample_size,
            num_layers=num_layers,
            patch_size=2,
            attention_head_dim=attention_head_dim,
            num_attention_heads=num_attention_heads,
            caption_channels=TINY_TEXT_DIM,
            in_channels=TINY_LATENT_CHANNELS,
            cross_attention_dim=inner_dim,
            out_channels=2 * TINY_LATENT_CHANNELS,
            attention_bias=True,
            activation_fn="gelu-approximate",
            num_embeds_ada_norm=1000,
            norm_type="ada_norm_single",
            norm_elementwise_affine=False,
            norm_eps=1e-6,
        )
    return transformer.eval()


def _build_scheduler() -> DPMSolverMultistepScheduler:
    """The inference scheduler PixArt-Σ ships: 2nd-order DPM-Solver++ on the linear DDPM betas.

    Training code builds a ``DDPMScheduler`` from this config (``DDPMScheduler.from_config``); the
    shared keys (1000 steps, linear betas 1e-4..2e-2, epsilon prediction) are what matter there.
    """
    return DPMSolverMultistepScheduler(
        num_train_timesteps=1000,
        beta_start=0.0001,
        beta_end=0.02,
        beta_schedule="linear",
        prediction_type="epsilon",
        algorithm_type="dpmsolver++",
        solver_order=2,
        solver_type="midpoint",
        lower_order_final=True,
        timestep_spacing="linspace",
    )


def tiny_image_size(sample_size: int = TINY_LATENT_SIZE) -> int:
    """Native image side length of a tiny pipeline built with ``sample_size``."""
    return sample_size * TINY_VAE_SCALE_FACTOR


def build_tiny_pipeline(
    seed: int = 0,
    *,
    num_layers: int = 2,
    num_attention_heads: int = 4,
    attention_head_dim: int = 8,
    sample_size: int = TINY_LATENT_SIZE,
) -> PixArtSigmaPipeline:
    """Build a randomly initialised PixArt-Σ pipeline, entirely offline, on the CPU in float32.

    The same ``seed`` and keyword arguments give bit-identical weights; the tokenizer does not
    depend on the seed at all. Each component is seeded independently, so the transformer's shape
    keywords never change the text encoder's or the VAE's weights. ``sample_size`` is the latent
    side length; it must be even (patch size 2) and the image is ``tiny_image_size(sample_size)``.
    """
    if sample_size <= 0 or sample_size % 2:
        raise ValueError(f"sample_size must be a positive even number (patch size 2), got {sample_size}")
    tokenizer = build_tiny_tokenizer()
    text_encoder = _build_text_encoder(len(tokenizer), seed + _TEXT_ENCODER_SEED_OFFSET)
    vae = _build_vae(seed + _VAE_SEED_OFFSET)
    transformer = build_tiny_transformer(
        seed + _TRANSFORMER_SEED_OFFSET,
        num_layers=num_layers,
        num_attention_heads=num_attention_heads,
        attention_head_dim=attention_head_dim,
        sample_size=sample_size,
    )
    pipe = PixArtSigmaPipeline(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        vae=vae,
        transformer=transformer,
        scheduler=_build_scheduler(),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def save_tiny_pipeline(folder: str | Path, seed: int = 0, **kwargs: Any) -> Path:
    """Build a tiny pipeline (``kwargs`` go to :func:`build_tiny_pipeline`) and save it in the
    diffusers layout (model_index.json plus one sub-folder per component, safetensors weights), so
    ``PixArtSigmaPipeline.from_pretrained(folder)`` loads it like real weights. Returns the folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    build_tiny_pipeline(seed, **kwargs).save_pretrained(folder, safe_serialization=True)
    return folder
