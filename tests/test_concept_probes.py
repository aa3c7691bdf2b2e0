import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor2_0

from benchmarks import concept_eval, concept_probes
from benchmarks.train_demo_model import DEMO_MODEL, load_demo_model


def test_block_zero_sees_no_prompt_and_later_blocks_do() -> None:
    rows = concept_probes.block_input_changes()
    assert {row["block"] for row in rows} == {0, 1, 2, 3}
    for row in rows:
        moved = min(row["sks_vs_circle"], row["sks_vs_square"])
        assert moved == 0.0 if row["block"] == 0 else moved > 0.1, row
        assert all(0 < share < 1 for share in row["shape_word_attention"].values()), row


def test_the_cross_attention_probe_adds_the_attention_mixed_coefficients_of_the_text() -> None:
    attn = load_demo_model(DEMO_MODEL).transformer.transformer_blocks[1].attn2
    method = concept_probes.PROBES["cross-attention"].method
    update = concept_probes.CrossAttentionDictionary(attn, method, torch.Generator().manual_seed(0), input_rms=1.0)
    image, text = torch.randn(2, 16, 128), torch.randn(2, 7, 128)
    mask = torch.zeros(2, 1, 7)
    mask[1, :, 5:] = -10000.0  # PixArt's form of a padded caption
    with torch.no_grad():
        update.dictionary.normal_()
        plain = AttnProcessor2_0()(attn, image, text, mask)
        assert torch.equal(update(attn, image, text, mask), plain)  # switched off: the frozen path
        update.active = True
        adapted = update(attn, image, text, mask)

        heads = attn.heads
        query = attn.to_q(image).view(2, 16, heads, -1).transpose(1, 2)
        key = attn.to_k(text).view(2, 7, heads, -1).transpose(1, 2)
        weights = torch.softmax(query @ key.transpose(-1, -2) * attn.scale + mask[:, None], dim=-1)
        scores = text @ update.coefficient_proj
        kept = scores >= scores.topk(update.active_atoms, dim=-1).values[..., -1:]
        coefficients = (scores * kept).view(2, 7, heads, -1).transpose(1, 2)
        expected = plain + (weights @ coefficients).transpose(1, 2).reshape(2, 16, -1) @ update.dictionary
    assert update.active_atoms == 10 and torch.allclose(adapted, expected, atol=1e-5)


def test_update_reach_is_zero_without_an_update_and_positive_with_one() -> None:
    budget = concept_eval.QUICK
    base = concept_eval.fine_tune(
        concept_eval.Method("base", "base"), concept_eval.Recipe(0, 0), 0, budget, DEMO_MODEL, concept_probes.TRAINING
    )
    ours = concept_probes.PROBES["all blocks"].method
    tuned = concept_eval.fine_tune(
        ours, concept_eval.Recipe(3e-3, 1000), 0, budget, DEMO_MODEL, concept_probes.TRAINING
    )
    with pytest.raises(ZeroDivisionError):
        concept_probes.update_reach(base, 0)
    assert 0 < concept_probes.update_reach(tuned, 0) < 10
