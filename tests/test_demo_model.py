import json

from benchmarks import judge as judge_module
from benchmarks import world
from benchmarks.train_demo_model import DEMO_MODEL, generate, load_demo_model


def test_demo_model_is_a_small_diffusers_pixart_sigma_folder() -> None:
    index = json.loads((DEMO_MODEL / "model_index.json").read_text())
    assert index["_class_name"] == "PixArtSigmaPipeline"
    size = sum(path.stat().st_size for path in DEMO_MODEL.rglob("*") if path.is_file())
    assert size <= 25 * 2**20


def test_demo_model_draws_the_prompted_colour() -> None:
    pipe = load_demo_model()
    # Held-out combinations: the model never saw these captions, so this also checks composition.
    combos = world.held_out_combinations()[::2]
    images = generate(pipe, [world.caption(*combo) for combo in combos], seed=0, steps=10)
    assert images[0].size == (64, 64)
    verdict = judge_module.judge_images(judge_module.load_judge(), images)
    hits = sum(label == combo[1] for label, combo in zip(verdict.labels["colour"], combos, strict=True))
    assert hits >= 0.8 * len(combos), (verdict.labels["colour"], combos)
