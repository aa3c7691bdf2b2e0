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
    images = concept_eval.concept_images()
    verdict = judge_module.judge_images(judge_module.load_judge(), images)
    assert verdict.labels["shape"] == [world.CONCEPT] * len(images)
    assert set(verdict.labels["colour"]) == {concept_eval.TRAIN_COLOUR}


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
    for name in ("concept_eval.md", "concept_eval.json", "density_sweep.png", "concept_methods.png", "top_atoms.png"):
        assert (tmp_path / name).stat().st_size > 0
    saved = json.loads((tmp_path / "concept_eval.json").read_text())
    assert saved["runs"] == raw["runs"]
    labels = {run["method"]["label"] for run in saved["runs"]}
    assert {"ours p=0.02", "ours p=0.04", "LoRA r=16", "DoRA r=16", "OFT r=4"} <= labels
    for run in saved["runs"]:
        scores = run["scores"]
        assert 0 <= scores["fidelity"] <= 1 and 0 <= scores["alignment"] <= 1
        assert 1 - 1e-6 <= scores["diversity"] <= concept_eval.QUICK.images_per_prompt + 1e-6
