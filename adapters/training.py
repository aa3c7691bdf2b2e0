"""DreamBooth-style fine-tuning of one concept, for our adapter and for the PEFT baselines.

The recipe is the PixArt-Σ authors' (``train_pixart_lora_hf.py``): images VAE-encoded once,
the prompt encoded once, DDPM noise, epsilon target, MSE on the first half of the output
channels (the transformer also predicts its learned sigma), AdamW. Every method runs through
``_fit`` so that comparisons differ only in what is trained.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, PixArtSigmaPipeline
from PIL import Image
from torch import nn

from adapters.importance import compute_atom_importance
from adapters.sparse_dictionary import AdapterHost, SampleRoute, SparseDictionaryAdapter, SparseDictionaryConfig

BaselineMethod = Literal["lora", "dora", "oft"]
BASELINE_METHODS: tuple[str, ...] = ("lora", "dora", "oft")
ProgressCallback = Callable[[int, int, float], None]
StopCheck = Callable[[], bool]
# Attention projections PEFT adapts in the baselines (self- and cross-attention alike).
PEFT_TARGET_MODULES = ["to_q", "to_k", "to_v", "to_out.0"]


class TrainingCancelled(RuntimeError):
    """``should_stop`` asked the loop to stop; raised between steps, never mid-step."""

    def __init__(self, step: int) -> None:
        super().__init__(f"training cancelled after step {step}")
        self.step = step


@dataclass
class TrainingConfig:
    """How to fine-tune; the defaults follow the paper (AdamW, lr 1e-4)."""

    steps: int = 400
    learning_rate: float = 1e-4
    batch_size: int = 1
    """Images per optimisation step, drawn with replacement from the concept images."""
    seed: int = 0
    """Seeds the adapter's initialisation, the image order, the noise and the timesteps."""
    resolution: int | None = None
    """Training image side in pixels; ``None`` uses the base model's native size."""
    weight_decay: float = 1e-2
    max_grad_norm: float = 1.0
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    """Autocast dtype for the forward pass; weights stay float32. Meant for GPUs."""
    gradient_checkpointing: bool = False
    max_sequence_length: int = 120
    importance_probes: int = 8
    """Timesteps per training image at which atom importance is measured after training."""
    augmentations: int = 0
    """Extra copies of every training image, each mirrored at random and shifted by up to
    ``augmentation_shift`` of its side (the edge pixels repeated into the gap), encoded once beside
    the originals.
    With a few images the concept is otherwise learnt at the few positions they show, and the
    generated images copy those layouts."""
    augmentation_shift: float = 0.125
    """The largest shift of an augmented copy, as a fraction of the image side."""
    prior_prompts: tuple[str, ...] = ()
    """Prompts of ordinary images the adapter must leave as the base draws them (prior
    preservation): before training, the base draws ``prior_images_per_prompt`` images of each and
    predicts their noise at ``prior_noise_draws`` random noisings each; every step adds the
    distance of the adapted prediction to the base's on a batch of those, weighted by
    ``prior_loss_weight``, to the concept's loss. The update lives in self-attention and sees the
    prompt only through what earlier blocks' cross-attention wrote into the image tokens; without
    such prompts nothing tells it to act on the concept's prompts only. (DreamBooth's form, the
    denoising loss on the base's images, was measured to move the prediction on them more than no
    prior at all: with a few images the adapter learns to reproduce them instead.)"""
    prior_images_per_prompt: int = 4
    prior_noise_draws: int = 16
    prior_loss_weight: float = 1.0
    prior_inference_steps: int = 20
    prior_guidance_scale: float = 4.5
    calibrate_init: bool = True
    """Scale W_s's initialisation to the measured RMS of each block's self-attention input on the
    training images, so the coefficients start at unit variance. PixArt's normalised and
    modulated attention input is far from unit-RMS (0.23-0.28 on the demo model), and with
    small coefficients the atoms' gradients, and so the early learning, are small too."""

    def validate(self) -> None:
        if not 1 <= self.steps <= 100_000:
            raise ValueError(f"steps must be in [1, 100000], got {self.steps}")
        if not 0.0 < self.learning_rate <= 1.0:
            raise ValueError(f"learning_rate must be in (0, 1], got {self.learning_rate}")
        if not 1 <= self.batch_size <= 64:
            raise ValueError(f"batch_size must be in [1, 64], got {self.batch_size}")
        if self.resolution is not None and not 8 <= self.resolution <= 4096:
            raise ValueError(f"resolution must be in [8, 4096], got {self.resolution}")
        if self.mixed_precision not in ("no", "bf16", "fp16"):
            raise ValueError(f"mixed_precision must be no, bf16 or fp16, got {self.mixed_precision!r}")
        if not 0 <= self.augmentations <= 16:
            raise ValueError(f"augmentations must be in [0, 16], got {self.augmentations}")
        if not 0.0 < self.augmentation_shift <= 0.5:
            raise ValueError(f"augmentation_shift must be in (0, 0.5], got {self.augmentation_shift}")
        if len(self.prior_prompts) > 64 or not all(prompt.strip() for prompt in self.prior_prompts):
            raise ValueError("prior_prompts must be at most 64 non-empty prompts")
        if not 1 <= self.prior_images_per_prompt <= 64:
            raise ValueError(f"prior_images_per_prompt must be in [1, 64], got {self.prior_images_per_prompt}")
        if not 1 <= self.prior_noise_draws <= 256:
            raise ValueError(f"prior_noise_draws must be in [1, 256], got {self.prior_noise_draws}")
        if not 0.0 <= self.prior_loss_weight <= 100.0:
            raise ValueError(f"prior_loss_weight must be in [0, 100], got {self.prior_loss_weight}")
        if self.importance_probes < 1:
            raise ValueError("importance_probes must be at least 1")


@dataclass
class ConceptData:
    """A concept's training data, encoded once: VAE latents and the T5 embedding of its prompt,
    one for every image or one per image (its caption)."""

    latents: torch.Tensor
    prompt_embeds: torch.Tensor
    prompt_attention_mask: torch.Tensor

    def conditioning(self, picks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The prompt embeddings and mask for the images ``picks`` selects."""
        if self.prompt_embeds.shape[0] == 1:
            batch = picks.shape[0]
            return self.prompt_embeds.expand(batch, -1, -1), self.prompt_attention_mask.expand(batch, -1)
        return self.prompt_embeds[picks], self.prompt_attention_mask[picks]


@dataclass
class PriorData:
    """Noisy latents of the base's own images of the prior prompts, with the base's noise
    prediction for each: the targets the adapted model must keep."""

    latents: torch.Tensor
    """The base's images, one per prior prompt and image, before noising."""
    noisy: torch.Tensor
    timesteps: torch.Tensor
    targets: torch.Tensor
    prompt_embeds: torch.Tensor
    prompt_attention_mask: torch.Tensor


@dataclass
class TrainingResult:
    adapter: SparseDictionaryAdapter
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0


@dataclass
class BaselineResult:
    model: nn.Module
    """The PEFT-wrapped transformer (it wraps, and so modifies, the transformer it was given)."""
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0


def native_resolution(pipeline: PixArtSigmaPipeline) -> int:
    return int(pipeline.transformer.config.sample_size) * int(pipeline.vae_scale_factor)


Prompt = str | Sequence[str]
"""One prompt for every training image, or one caption per image (in the images' order)."""


def encode_concept(
    pipeline: PixArtSigmaPipeline,
    images: Sequence[Image.Image],
    prompt: Prompt,
    config: TrainingConfig,
    generator: torch.Generator,
) -> ConceptData:
    """VAE-encode the images and T5-encode the prompt (or captions) once, as the training recipe does."""
    if not images:
        raise ValueError("give at least one training image")
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    if len(prompts) not in (1, len(images)):
        raise ValueError(f"give one prompt, or one caption per image: {len(prompts)} captions for {len(images)} images")
    if not all(text.strip() for text in prompts):
        raise ValueError("the prompt must name the concept")
    device = pipeline.transformer.device
    resolution = config.resolution or native_resolution(pipeline)
    originals = [_to_pixels(image, resolution) for image in images]
    variants = [
        _mirrored_and_shifted(p, config.augmentation_shift, generator)
        for _ in range(config.augmentations)
        for p in originals
    ]
    if len(prompts) > 1:
        prompts = prompts * (1 + config.augmentations)
    pixels = torch.stack(originals + variants).to(device, pipeline.vae.dtype)
    with torch.no_grad():
        distribution = pipeline.vae.encode(pixels).latent_dist
        noise = torch.randn(distribution.mean.shape, generator=generator).to(device, distribution.mean.dtype)
        latents = (distribution.mean + distribution.std * noise) * pipeline.vae.config.scaling_factor
        embeds, mask, _, _ = pipeline.encode_prompt(
            prompts,
            do_classifier_free_guidance=False,
            device=device,
            clean_caption=False,
            max_sequence_length=config.max_sequence_length,
        )
    return ConceptData(latents.float(), embeds, mask)


@torch.no_grad()
def draw_prior(pipeline: PixArtSigmaPipeline, config: TrainingConfig, seed: int) -> PriorData | None:
    """The base model's own images of ``config.prior_prompts``, drawn as the pipeline draws them,
    noised ``config.prior_noise_draws`` times each with the base's noise prediction as the target;
    ``None`` without prior prompts. Call it while no update acts on the pipeline's transformer."""
    if not config.prior_prompts:
        return None
    resolution = config.resolution or native_resolution(pipeline)
    device = pipeline.transformer.device
    prompts = [prompt for prompt in config.prior_prompts for _ in range(config.prior_images_per_prompt)]
    latents = pipeline(
        prompt=prompts,
        negative_prompt="",
        num_inference_steps=config.prior_inference_steps,
        guidance_scale=config.prior_guidance_scale,
        height=resolution,
        width=resolution,
        generator=torch.Generator(device).manual_seed(seed),
        output_type="latent",
        use_resolution_binning=False,
        clean_caption=False,
        max_sequence_length=config.max_sequence_length,
    ).images.float()
    embeds, mask, _, _ = pipeline.encode_prompt(
        prompts,
        do_classifier_free_guidance=False,
        device=device,
        clean_caption=False,
        max_sequence_length=config.max_sequence_length,
    )
    images = ConceptData(latents, embeds, mask)
    generator = torch.Generator().manual_seed(seed)
    scheduler = DDPMScheduler.from_config(pipeline.scheduler.config)
    picks = torch.arange(len(prompts)).repeat(config.prior_noise_draws).to(device)
    noise = torch.randn((picks.shape[0], *latents.shape[1:]), generator=generator).to(device)
    timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (picks.shape[0],), generator=generator)
    noisy = scheduler.add_noise(latents[picks], noise, timesteps.to(device))
    chunks = [slice(start, start + 64) for start in range(0, picks.shape[0], 64)]
    targets = torch.cat(
        [_predict_noise(pipeline.transformer, noisy[c], timesteps[c].to(device), images, picks[c]) for c in chunks]
    )
    return PriorData(latents, noisy, timesteps, targets.float(), embeds[picks], mask[picks])


def _to_pixels(image: Image.Image, resolution: int) -> torch.Tensor:
    """Center-crop to a square, resize, scale to [-1, 1], channels first."""
    image = image.convert("RGB")
    side = min(image.size)
    left, top = (image.width - side) // 2, (image.height - side) // 2
    image = image.crop((left, top, left + side, top + side)).resize((resolution, resolution), Image.BICUBIC)
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1)


def _mirrored_and_shifted(pixels: torch.Tensor, shift: float, generator: torch.Generator) -> torch.Tensor:
    side = pixels.shape[-1]
    margin = max(round(side * shift), 1)
    if torch.rand((), generator=generator) < 0.5:
        pixels = pixels.flip(-1)
    padded = F.pad(pixels[None], (margin, margin, margin, margin), mode="replicate")[0]
    top, left = (int(v) for v in torch.randint(0, 2 * margin + 1, (2,), generator=generator))
    return padded[:, top : top + side, left : left + side]


def train_adapter(
    pipeline: PixArtSigmaPipeline,
    host: AdapterHost,
    images: Sequence[Image.Image],
    prompt: Prompt,
    adapter_config: SparseDictionaryConfig,
    config: TrainingConfig,
    on_progress: ProgressCallback | None = None,
    should_stop: StopCheck | None = None,
) -> TrainingResult:
    """Learn a sparse dictionary adapter for the concept; only W_s and D train.

    The adapter is resident in ``host`` only while it trains; the returned adapter carries
    its atom importance, measured on the training images at ``config.importance_probes``
    timesteps each.
    """
    config.validate()
    generator = torch.Generator().manual_seed(config.seed)
    data = encode_concept(pipeline, images, prompt, config, generator)
    prior = draw_prior(pipeline, config, config.seed)
    input_rms = None
    if config.calibrate_init:
        input_rms = measure_input_rms(pipeline.transformer, adapter_config.blocks(host.num_blocks), data)
    adapter = SparseDictionaryAdapter.create(adapter_config, pipeline.transformer, config.seed, input_rms)
    name = f"__training_{id(adapter)}"
    host.add(name, adapter)
    try:
        adapter.float().train()
        with host.route([SampleRoute(name)]):
            losses, seconds = _fit(
                pipeline, list(adapter.parameters()), data, config, generator, on_progress, should_stop, prior
            )
            adapter.eval()
            adapter.importance = compute_atom_importance(
                pipeline.transformer,
                host,
                adapter,
                data.latents,
                data.prompt_embeds,
                data.prompt_attention_mask,
                config.importance_probes,
            )
        adapter.to(adapter_config.torch_dtype)
    finally:
        host.remove(name)
    return TrainingResult(adapter, losses, seconds)


@torch.no_grad()
def measure_input_rms(
    transformer: nn.Module, blocks: Sequence[int], data: ConceptData, probes: int = 4
) -> dict[int, float]:
    """Per block, the RMS of its self-attention input over the training latents, noised at
    ``probes`` evenly spaced timesteps (the modulation that scales the input depends on t)."""
    squares = dict.fromkeys(blocks, 0.0)
    counts = dict.fromkeys(blocks, 0)

    def recorder(block: int) -> Callable[..., None]:
        def record(_: nn.Module, args: tuple[torch.Tensor, ...], kwargs: dict[str, torch.Tensor]) -> None:
            hidden = args[0] if args else kwargs["hidden_states"]
            squares[block] += float(hidden.double().square().sum())
            counts[block] += hidden.numel()

        return record

    handles = [
        transformer.transformer_blocks[block].attn1.register_forward_pre_hook(recorder(block), with_kwargs=True)
        for block in blocks
    ]
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    generator = torch.Generator().manual_seed(0)
    try:
        for timestep in torch.linspace(0, scheduler.config.num_train_timesteps - 1, probes).round().long():
            batch = data.latents.shape[0]
            noise = torch.randn(data.latents.shape, generator=generator).to(data.latents.device)
            noisy = scheduler.add_noise(data.latents, noise, timestep.repeat(batch))
            everyone = torch.arange(batch, device=noisy.device)
            _predict_noise(transformer, noisy, timestep.repeat(batch).to(noisy.device), data, everyone)
    finally:
        for handle in handles:
            handle.remove()
    return {block: (squares[block] / max(counts[block], 1)) ** 0.5 for block in blocks}


def train_baseline(
    pipeline: PixArtSigmaPipeline,
    images: Sequence[Image.Image],
    prompt: Prompt,
    method: BaselineMethod,
    config: TrainingConfig,
    on_progress: ProgressCallback | None = None,
    should_stop: StopCheck | None = None,
) -> BaselineResult:
    """Fine-tune a PEFT baseline (LoRA r=16, DoRA r=16 or OFT r=4) with the same loop.

    PEFT wraps ``pipeline.transformer`` in place, so give it a pipeline whose transformer
    no other adapter is using.
    """
    config.validate()
    prior = draw_prior(pipeline, config, config.seed)
    model = peft_wrap(pipeline.transformer, method, seed=config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    data = encode_concept(pipeline, images, prompt, config, generator)
    trainable = [p for p in model.parameters() if p.requires_grad]
    losses, seconds = _fit(pipeline, trainable, data, config, generator, on_progress, should_stop, prior)
    return BaselineResult(model, losses, seconds)


def peft_wrap(transformer: nn.Module, method: str, seed: int = 0) -> nn.Module:
    """Inject a PEFT baseline into ``transformer`` with the paper's ranks."""
    from peft import LoraConfig, OFTConfig, get_peft_model

    if method not in BASELINE_METHODS:
        raise ValueError(f"method must be one of {BASELINE_METHODS}, got {method!r}")
    if method == "oft":
        peft_config = OFTConfig(r=4, oft_block_size=0, target_modules=PEFT_TARGET_MODULES)
    else:
        peft_config = LoraConfig(r=16, lora_alpha=16, target_modules=PEFT_TARGET_MODULES, use_dora=method == "dora")
    torch.manual_seed(seed)  # PEFT draws its initial weights from the global generator
    return get_peft_model(transformer, peft_config)


def _fit(
    pipeline: PixArtSigmaPipeline,
    parameters: list[nn.Parameter],
    data: ConceptData,
    config: TrainingConfig,
    generator: torch.Generator,
    on_progress: ProgressCallback | None,
    should_stop: StopCheck | None,
    prior: PriorData | None = None,
) -> tuple[list[float], float]:
    """AdamW on ``parameters``; the reported loss is the concept's (the prior's is added to the
    gradient only)."""
    transformer = pipeline.transformer
    transformer.requires_grad_(False)
    for parameter in parameters:
        parameter.requires_grad_(True)
    optimizer = torch.optim.AdamW(parameters, lr=config.learning_rate, weight_decay=config.weight_decay)
    scheduler = DDPMScheduler.from_config(pipeline.scheduler.config)
    losses: list[float] = []
    started = time.perf_counter()
    with _gradient_checkpointing(transformer, config.gradient_checkpointing):
        for step in range(1, config.steps + 1):
            if should_stop is not None and should_stop():
                raise TrainingCancelled(step - 1)
            loss = _denoising_loss(transformer, scheduler, data, config, generator)
            total = loss
            if prior is not None:
                total = loss + config.prior_loss_weight * _prior_loss(transformer, prior, config, generator)
            optimizer.zero_grad(set_to_none=True)
            total.backward()
            torch.nn.utils.clip_grad_norm_(parameters, config.max_grad_norm)
            optimizer.step()
            losses.append(loss.item())
            if on_progress is not None:
                on_progress(step, config.steps, losses[-1])
    for parameter in parameters:
        parameter.requires_grad_(False)
    return losses, time.perf_counter() - started


def _denoising_loss(
    transformer: nn.Module,
    scheduler: DDPMScheduler,
    data: ConceptData,
    config: TrainingConfig,
    generator: torch.Generator,
) -> torch.Tensor:
    """MSE of the predicted noise on ``config.batch_size`` of ``data``'s latents, noised at random
    timesteps."""
    device = data.latents.device
    picks = torch.randint(0, data.latents.shape[0], (config.batch_size,), generator=generator)
    latents = data.latents[picks.to(device)]
    noise = torch.randn(latents.shape, generator=generator).to(device)
    timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (config.batch_size,), generator=generator)
    noisy = scheduler.add_noise(latents, noise, timesteps).to(device)
    with _autocast(device, config.mixed_precision):
        prediction = _predict_noise(transformer, noisy, timesteps.to(device), data, picks.to(device))
    return F.mse_loss(prediction.float(), noise.float())


def _prior_loss(
    transformer: nn.Module, prior: PriorData, config: TrainingConfig, generator: torch.Generator
) -> torch.Tensor:
    """MSE between the adapted and the base's noise prediction on ``config.batch_size`` of the prior's noisy latents."""
    device = prior.noisy.device
    picks = torch.randint(0, prior.noisy.shape[0], (config.batch_size,), generator=generator).to(device)
    data = ConceptData(prior.noisy, prior.prompt_embeds, prior.prompt_attention_mask)
    with _autocast(device, config.mixed_precision):
        prediction = _predict_noise(transformer, prior.noisy[picks], prior.timesteps[picks].to(device), data, picks)
    return F.mse_loss(prediction.float(), prior.targets[picks])


def _predict_noise(
    transformer: nn.Module, noisy: torch.Tensor, timesteps: torch.Tensor, data: ConceptData, picks: torch.Tensor
) -> torch.Tensor:
    """The predicted noise of ``noisy``, the latents of the images ``picks`` selects, noised."""
    dtype = next(transformer.parameters()).dtype
    embeds, mask = data.conditioning(picks)
    output = transformer(
        noisy.to(dtype),
        encoder_hidden_states=embeds,
        encoder_attention_mask=mask,
        timestep=timesteps,
        added_cond_kwargs={"resolution": None, "aspect_ratio": None},
    ).sample
    # The transformer predicts [epsilon, learned sigma]; only epsilon is trained.
    if output.shape[1] == 2 * noisy.shape[1]:
        output = output.chunk(2, dim=1)[0]
    return output


@contextlib.contextmanager
def _gradient_checkpointing(transformer: nn.Module, enabled: bool) -> Iterator[None]:
    if not enabled:
        yield
        return
    transformer.enable_gradient_checkpointing()
    try:
        yield
    finally:
        transformer.disable_gradient_checkpointing()


def _autocast(device: torch.device, mixed_precision: str) -> contextlib.AbstractContextManager[None]:
    if mixed_precision == "no":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if mixed_precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)
