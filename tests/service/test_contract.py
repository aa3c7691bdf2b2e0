"""The typed gateway <-> worker messages: what each side writes, the other reads back, and what
neither reads (another schema version, a message of the wrong form) is refused with a message."""

from collections.abc import Callable

import pytest

from service.core.contract import (
    SCHEMA_VERSION,
    AdapterSpec,
    AppliedAdapter,
    AtomMaskSpec,
    FinetuneParams,
    FinetuneResult,
    GenerateParams,
    GenerateResult,
    MessageError,
    TrainingSpec,
    parse_result,
)


def finetune_params() -> FinetuneParams:
    return FinetuneParams(
        adapter_id="01ARZ3NDEKTSV4RRFFQ69G5FAV",
        prompt="a photo of sks",
        captions=["a photo of sks on a table", "a photo of sks outside"],
        adapter=AdapterSpec(num_atoms=16, density=0.25, activation="relu"),
        training=TrainingSpec(steps=5, learning_rate=1e-3, batch_size=2, seed=3, resolution=None, image_count=2),
        images=["0.png", "1.jpg"],
    )


def test_messages_read_back_as_written(generate_params: Callable[..., GenerateParams]) -> None:
    generation = generate_params(adapter_id="A", atom_mask=AtomMaskSpec(mode="drop", blocks={1: [2, 7]}), seed=9)
    for message in (generation, finetune_params()):
        stored = message.model_dump(mode="json")
        assert stored["schema_version"] == SCHEMA_VERSION
        assert type(message).parse(stored) == message
    assert generation.total_steps == 20 and finetune_params().total_steps == 5
    assert parse_result("finetune", FinetuneResult(adapter_id="A").model_dump()) == FinetuneResult(adapter_id="A")
    applied = [
        AppliedAdapter(adapter_id="A", scale=1.0, tier="host"),
        AppliedAdapter(adapter_id="B", scale=-0.5, tier="device"),
    ]
    result = GenerateResult(image_count=2, seed=9, adapter_tier="host", adapters=applied, batch_size=6)
    assert parse_result("generate", result.model_dump()) == result


def test_another_schema_version_is_refused_with_what_to_do(generate_params: Callable[..., GenerateParams]) -> None:
    newer = {**generate_params().model_dump(mode="json"), "schema_version": SCHEMA_VERSION + 1}
    with pytest.raises(MessageError) as raised:
        GenerateParams.parse(newer)
    assert raised.value.code == "version_mismatch"
    message = raised.value.message
    assert f"came with message schema {SCHEMA_VERSION + 1}, and this process reads schema {SCHEMA_VERSION}" in message
    assert "run one version on both" in message
    # A message from before versions existed has none.
    unversioned = FinetuneResult(adapter_id="A").model_dump(exclude={"schema_version"})
    with pytest.raises(MessageError, match="this job's result came with no message schema version"):
        parse_result("finetune", unversioned)


@pytest.mark.parametrize(
    ("change", "says"),
    [
        (lambda m: m.pop("training"), "training: Field required"),
        (lambda m: m["adapter"].update(activation="tanh"), "adapter.activation: Input should be"),
        (lambda m: m.update(images="0.png"), "images: Input should be a valid list"),
        (lambda m: m.update(extra=1), "extra: Extra inputs are not permitted"),
    ],
)
def test_a_malformed_message_is_refused_naming_the_field(change: Callable[[dict], object], says: str) -> None:
    stored = finetune_params().model_dump(mode="json")
    change(stored)
    with pytest.raises(MessageError) as raised:
        FinetuneParams.parse(stored)
    assert raised.value.code == "invalid_message"
    assert raised.value.message.startswith(f"this job's parameters cannot be read with message schema {SCHEMA_VERSION}")
    assert says in raised.value.message
