"""What a sparse dictionary adapter costs per denoising step, against the base and PEFT LoRA.

Runs the full-size PixArt-Σ transformer (its real config, random weights) for one denoising
forward pass: the base, with an adapter (M=256, p=0.04), with PEFT LoRA r=16 on q, k, v, out
(unmerged), a batch of 4 samples served by 4 different adapters against a batch of 4 served
by one, and one sample composing 2 and 4 adapters. Every variant runs in the same process,
interleaved round by round, and the report gives medians, and ratios to the base (each the
median of per-round ratios) next to the adapter's FLOP floor (``flop_floor_ratio``).

    python benchmarks/adapter_overhead.py --quick               # CPU, 4 blocks, < 2 minutes
    python benchmarks/adapter_overhead.py                       # CPU, all 28 blocks, 256 px
    python benchmarks/adapter_overhead.py --device cuda         # GPU, bfloat16, 1024 px
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import random
import statistics
import sys
import time
from collections.abc import Callable

import torch
from diffusers import PixArtTransformer2DModel

from adapters import AdapterHost, SampleRoute, SparseDictionaryAdapter, SparseDictionaryConfig
from adapters.training import peft_wrap

# PixArt-Σ XL-2 (PixArt-alpha/PixArt-Sigma-XL-2-*-MS transformer/config.json), minus sample_size.
PIXART_SIGMA_CONFIG = {
    "num_attention_heads": 16,
    "attention_head_dim": 72,
    "in_channels": 4,
    "out_channels": 8,
    "num_layers": 28,
    "dropout": 0.0,
    "norm_num_groups": 32,
    "cross_attention_dim": 1152,
    "attention_bias": True,
    "patch_size": 2,
    "activation_fn": "gelu-approximate",
    "num_embeds_ada_norm": 1000,
    "upcast_attention": False,
    "norm_type": "ada_norm_single",
    "norm_elementwise_affine": False,
    "norm_eps": 1e-6,
    "caption_channels": 4096,
    "use_additional_conditions": False,
}
TEXT_TOKENS = 120
ATOMS = 256
DENSITY = 0.04


def flop_floor_ratio(tokens: int, channels: int = 1152, atoms: int = ATOMS, text_tokens: int = TEXT_TOKENS) -> float:
    """Adapter FLOPs over frozen-block FLOPs: the least overhead any implementation has.

    Per block, for N tokens, C channels, M atoms and T text tokens: the frozen block costs
    2N(4C² + 2C² + 8C²) (self-attention q, k, v, out; cross-attention q, out; the 4C-wide MLP)
    + 4N²C (self-attention's maps) + 4TC² (cross-attention's k and v); the adapter costs
    2NCM (X·W_s) + 2N²M (A·S) + 2NMC ((A·S)·D).
    """
    n, c, m, t = tokens, channels, atoms, text_tokens
    frozen = 2 * n * (4 * c * c + 2 * c * c + 8 * c * c) + 4 * n * n * c + 4 * t * c * c
    adapter = 2 * n * c * m + 2 * n * n * m + 2 * n * m * c
    return adapter / frozen


def build_transformer(resolution: int, num_layers: int, device: str, dtype: torch.dtype) -> PixArtTransformer2DModel:
    config = dict(PIXART_SIGMA_CONFIG, num_layers=num_layers, sample_size=resolution // 8)
    torch.manual_seed(0)
    return PixArtTransformer2DModel(**config).to(device, dtype).eval()


def random_adapter(transformer: PixArtTransformer2DModel, seed: int) -> SparseDictionaryAdapter:
    adapter = SparseDictionaryAdapter.create(
        SparseDictionaryConfig(num_atoms=ATOMS, density=DENSITY), transformer, seed=seed
    )
    with torch.no_grad():
        for layer in adapter.layers.values():
            layer.dictionary.normal_(0, 0.02)
    return adapter


def make_inputs(batch: int, resolution: int, device: str, dtype: torch.dtype) -> dict:
    generator = torch.Generator().manual_seed(1)
    latent = resolution // 8
    return {
        "hidden_states": torch.randn(batch, 4, latent, latent, generator=generator).to(device, dtype),
        "encoder_hidden_states": torch.randn(batch, TEXT_TOKENS, 4096, generator=generator).to(device, dtype),
        "timestep": torch.full((batch,), 500, device=device),
        "added_cond_kwargs": {"resolution": None, "aspect_ratio": None},
    }


def timed(fn: Callable[[], object], device: str) -> tuple[float, float]:
    """Wall seconds, and this process's CPU seconds (less sensitive to noisy neighbours on a CPU)."""
    if device == "cuda":
        torch.cuda.synchronize()
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - wall, time.process_time() - cpu


def interleaved(
    variants: dict[str, Callable[[], object]], runs: int, device: str
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Wall and CPU seconds of every variant, ``runs`` rounds after a warm-up round. Each round
    runs every variant once, in a shuffled order so that no variant always follows a heavy one;
    ratios are taken within a round, where the neighbours' load is alike."""
    for step in variants.values():  # warm-up: allocator, kernels, lazy inits
        step()
    times: dict[str, list[float]] = {name: [] for name in variants}
    cpu_times: dict[str, list[float]] = {name: [] for name in variants}
    order = random.Random(0)
    for _ in range(runs):
        names = list(variants)
        order.shuffle(names)
        for name in names:
            wall, cpu = timed(variants[name], device)
            times[name].append(wall)
            cpu_times[name].append(cpu)
    return times, cpu_times


ATTENTION_ROUNDS = 40
CALLS_PER_ROUND = 5


def attention_calls(
    transformer: PixArtTransformer2DModel,
    host: AdapterHost,
    inputs: dict,
    composed_two: list[SampleRoute],
    composed_four: list[SampleRoute],
    device: str,
) -> dict[str, object]:
    """Block 0's self-attention alone, on the hidden states of the step's input: the base, one
    adapter, and 2 and 4 composed; each time the mean of ``CALLS_PER_ROUND`` calls."""
    attention = transformer.transformer_blocks[0].attn1
    with torch.no_grad():
        hidden = transformer.pos_embed(inputs["hidden_states"])

    def run(routes: list[SampleRoute] | None) -> Callable[[], object]:
        def calls() -> object:
            with torch.no_grad():
                for _ in range(CALLS_PER_ROUND):
                    if routes is None:
                        attention(hidden)
                    else:
                        with host.route(routes):
                            attention(hidden)
            return None

        return calls

    variants = {
        "base": run(None),
        "adapter": run([SampleRoute("a0")]),
        "composed2": run(composed_two),
        "composed4": run(composed_four),
    }
    times, _ = interleaved(variants, ATTENTION_ROUNDS, device)
    return {
        "rounds": ATTENTION_ROUNDS,
        "ms": {name: 1000 * statistics.median(values) / CALLS_PER_ROUND for name, values in times.items()},
        "adapter_ratio": ratio("adapter", "base", times),
        "composed2_ratio": ratio("composed2", "base", times),
        "composed4_ratio": ratio("composed4", "base", times),
        "composed2_overhead_vs_one": overhead_ratio("composed2", "adapter", times),
        "composed4_overhead_vs_one": overhead_ratio("composed4", "adapter", times),
    }


def ratio(numerator: str, denominator: str, samples: dict[str, list[float]]) -> float:
    """Median over rounds of the per-round ratio of two variants' times."""
    pairs = zip(samples[numerator], samples[denominator], strict=True)
    return statistics.median(top / bottom for top, bottom in pairs)


def overhead_ratio(variant: str, reference: str, samples: dict[str, list[float]]) -> float:
    """How many times the reference's added time (over the base) the variant adds, from the
    per-round ratios' medians: a per-round quotient of two small differences would be noise."""
    return (ratio(variant, "base", samples) - 1) / (ratio(reference, "base", samples) - 1)


def machine(device: str) -> str:
    if device == "cuda":
        return f"{torch.cuda.get_device_name()} (torch {torch.__version__})"
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--quick", action="store_true", help="4 blocks and 3 rounds: under 2 minutes on 2 CPUs")
    parser.add_argument("--runs", type=int, default=None, help="timed rounds per variant (default 9, quick 3)")
    parser.add_argument("--layers", type=int, default=None, help="transformer blocks (default 28, quick 4)")
    parser.add_argument("--resolution", type=int, default=None, help="pixels (default 256 on CPU, 1024 on CUDA)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--output", default=None, help="also write the JSON here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    device = args.device
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    resolution = args.resolution or (1024 if device == "cuda" else 256)
    layers = args.layers or (4 if args.quick else 28)
    runs = args.runs or (3 if args.quick else 9)
    tokens = (resolution // 16) ** 2

    transformer = build_transformer(resolution, layers, device, dtype)
    lora_model = peft_wrap(copy.deepcopy(transformer), "lora")
    host = AdapterHost(transformer)
    for index in range(4):
        host.add(f"a{index}", random_adapter(transformer, seed=index))

    single = make_inputs(1, resolution, device, dtype)
    batch4 = make_inputs(4, resolution, device, dtype)
    one_adapter = [SampleRoute("a0")]
    four_adapters = [SampleRoute(f"a{i}") for i in range(4)]
    composed_two = [SampleRoute.compose([SampleRoute("a0"), SampleRoute("a1", scale=0.5)])]
    composed_four = [SampleRoute.compose([SampleRoute(f"a{i}", scale=0.5) for i in range(4)])]

    def run(model: torch.nn.Module, inputs: dict, routes: list[SampleRoute] | None = None) -> Callable[[], object]:
        def step() -> object:
            with torch.no_grad():
                if routes is None:
                    return model(**inputs)
                with host.route(routes):
                    return model(**inputs)

        return step

    variants = {
        "base": run(transformer, single),
        "adapter": run(transformer, single, one_adapter),
        "lora": run(lora_model, single),
        "homogeneous_batch4": run(transformer, batch4, one_adapter * 4),
        "heterogeneous_batch4": run(transformer, batch4, four_adapters),
        "composed2": run(transformer, single, composed_two),
        "composed4": run(transformer, single, composed_four),
    }
    times, cpu_times = interleaved(variants, runs, device)
    median = {name: statistics.median(values) for name, values in times.items()}
    # The adapters' share of a whole step is a few per cent, under the machine's noise between
    # rounds; one self-attention call, where all of it is spent, gives composition's cost clearly.
    attention = attention_calls(transformer, host, single, composed_two, composed_four, device)

    result = {
        "machine": machine(device),
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
        "device": device,
        "dtype": str(dtype).removeprefix("torch."),
        "resolution": resolution,
        "tokens": tokens,
        "layers": layers,
        "runs": runs,
        "threads": torch.get_num_threads(),
        "base_s": median["base"],
        "adapter_s": median["adapter"],
        "lora_s": median["lora"],
        "homogeneous_batch4_s": median["homogeneous_batch4"],
        "heterogeneous_batch4_s": median["heterogeneous_batch4"],
        "adapter_ratio": ratio("adapter", "base", times),
        "lora_ratio": ratio("lora", "base", times),
        "flop_floor_ratio": 1 + flop_floor_ratio(tokens),
        # Issue #13: at most 1.5 times the floor's overhead (issue #2 asked 1.25 at 256 px).
        "adapter_ratio_bar": 1 + 1.5 * flop_floor_ratio(tokens),
        "hetero_batch_ratio": ratio("homogeneous_batch4", "heterogeneous_batch4", times),
        "composed2_s": median["composed2"],
        "composed4_s": median["composed4"],
        "composed2_ratio": ratio("composed2", "base", times),
        "composed4_ratio": ratio("composed4", "base", times),
        # Issue #16: two composed adapters add at most 2.2 times one adapter's overhead.
        "composed2_overhead_vs_one": overhead_ratio("composed2", "adapter", times),
        # Two (four) adapters' FLOPs, as one adapter of twice (four times) the atoms.
        "composed2_flop_floor_ratio": 1 + flop_floor_ratio(tokens, atoms=2 * ATOMS),
        "composed4_flop_floor_ratio": 1 + flop_floor_ratio(tokens, atoms=4 * ATOMS),
        "attention_call": attention,
        "composed4_overhead_vs_one": overhead_ratio("composed4", "adapter", times),
        "cpu_adapter_ratio": ratio("adapter", "base", cpu_times),
        "cpu_lora_ratio": ratio("lora", "base", cpu_times),
        "cpu_hetero_batch_ratio": ratio("homogeneous_batch4", "heterogeneous_batch4", cpu_times),
        "wall_times_s": times,
        "cpu_times_s": cpu_times,
    }
    result["adapter_bar_met"] = result["adapter_ratio"] <= result["adapter_ratio_bar"]
    result["hetero_bar_met"] = result["hetero_batch_ratio"] >= 0.95
    # Judged on the attention call, where the composition's cost is measured above the noise.
    result["composed2_bar_met"] = attention["composed2_overhead_vs_one"] <= 2.2  # type: ignore[operator]
    text = json.dumps(result, indent=2)
    print(text)
    if args.output:
        with open(args.output, "w") as handle:
            handle.write(text + "\n")


if __name__ == "__main__":
    main()
