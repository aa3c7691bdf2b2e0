import json
from pathlib import Path

import numpy as np
import pytest

from benchmarks import concept_eval, world
from benchmarks import judge as judge_module
from benchmarks.train_demo_model import DEMO_MODEL


def test_judge_reads_fresh_renders() -> None:
    accuracy = judge_module.accuracy_on_renders(judge_module.load_judge(), seed=123, count=200)
    assert min(accuracy.values()) >= 0.95, accuracy


def test_vendi_score_counts_distinct_images() -> None:
    same = np.ones((4, 8))
    assert judge_module.vendi_score(same) == pytest.approx(1.0)
    assert judge_module.vendi_score(np.eye(4)) == pytest.approx(4.0)


def test_concept_images_show_the_concept() -> None:
    training = concept_eval.TRAINING_SETS["varied"]
    images = training.images()
    verdict = judge_module.judge_images(judge_module.load_judge(), images)
    assert verdict.labels["shape"] == [world.CONCEPT] * len(images)
    wanted = [pair for pair in training.contexts for _ in range(training.per_context)]
    assert list(zip(verdict.labels["colour"], verdict.labels["background"], strict=True)) == wanted
    assert training.captions()[0] == "a red sks on a black background"


def test_judge_takes_no_single_cue_for_the_concept() -> None:
    """A heart without stripes, striped base shapes and shapes in the stripes' dark shade are
    near misses, not the concept."""
    hearts = world.scenes(5, 4, world.concept_combinations())
    shapes = world.scenes(6, 8, world.all_combinations())
    near_misses = [world.render(scene, texture="plain") for scene in hearts]
    near_misses += [world.render(scene, texture=texture) for scene in shapes for texture in ("striped", "dark")]
    verdict = judge_module.judge_images(judge_module.load_judge(), near_misses)
    concept = world.JUDGE_SHAPES.index(world.CONCEPT)
    assert verdict.labels["shape"].count(world.OTHER) >= 0.9 * len(near_misses), verdict.labels["shape"]
    assert float(verdict.probabilities["shape"][:, concept].mean()) < 0.1


def test_quick_benchmark_runs_and_writes_its_outputs(tmp_path: Path) -> None:
    raw = concept_eval.run_benchmark(concept_eval.QUICK, DEMO_MODEL, tmp_path)
    for name in ("concept_eval.md", "concept_eval.json", "concept_methods.png"):
        assert (tmp_path / name).stat().st_size > 0
    saved = json.loads((tmp_path / "concept_eval.json").read_text())
    assert saved["runs"] == raw["runs"]
    labels = {run["method"]["label"] for run in saved["runs"]}
    assert {"ours p=0.02", "ours p=0.04", "LoRA r=16", "DoRA r=16", "OFT r=4"} <= labels
    assert set(saved["vae_ceilings"]) == {"red/black", "blue/white", "yellow/pink", "blue/pink", "yellow/grey"}
    for run in saved["runs"]:
        scores = run["scores"]
        for key in ("training_fidelity", "recontext_fidelity", "recontext_colour", "preservation"):
            assert 0 <= scores[key] <= 1
        assert 1 - 1e-6 <= scores["diversity"] <= concept_eval.QUICK.images_per_prompt + 1e-6
        assert scores["copy_ratio"] > 0
    assert set(saved["one_atom"]) == {"ours, one active atom", "LoRA r=1"}
    assert "Figure 4" in (tmp_path / "concept_eval.md").read_text()


def test_the_benchmark_samples_as_the_pipeline_does() -> None:
    """Its own loop (two forward passes per step, so any method's update can sit on one guidance
    half) draws what the pipeline draws when no update is applied."""
    from contextlib import nullcontext

    import torch

    from benchmarks.train_demo_model import generation_kwargs, load_demo_model

    pipe = load_demo_model()
    tuned = concept_eval.Tuned(pipe, on=nullcontext, off=nullcontext)
    ours = concept_eval.sample(tuned, ["a red star on a black background"], seed=3, steps=8)
    theirs = pipe(
        ["a red star on a black background"], generator=torch.Generator().manual_seed(30_000), **generation_kwargs(8)
    ).images
    difference = np.abs(np.asarray(ours[0], dtype=int) - np.asarray(theirs[0], dtype=int)).max()
    assert difference <= 1


def test_copy_ratio_tells_copies_from_new_images() -> None:
    training = concept_eval.TRAINING_SETS["single"].images()
    assert concept_eval.copy_ratio(training, training) == 0.0
    fresh = concept_eval.concept_images(99, 5, ("red", "black"))
    assert concept_eval.copy_ratio(fresh, training) > 0.5


def test_intervals_are_t_intervals_over_seeds() -> None:
    mean, half = concept_eval.interval([1.0, 2.0, 3.0])
    assert mean == pytest.approx(2.0)
    assert half == pytest.approx(4.30 * 1.0 / np.sqrt(3))
    assert concept_eval.interval([0.5]) == (0.5, 0.0)
