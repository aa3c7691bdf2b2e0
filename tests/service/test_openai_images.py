"""The official ``openai`` client, with only ``base_url`` and ``api_key`` changed, generates images
through the base and through a tenant's adapter, lists models, and reads atomtune's errors as
OpenAI's."""

import base64
import io
from collections.abc import Callable

import httpx
import openai
import pytest
from PIL import Image

from service.core.redis_db import connect
from service.core.settings import Settings
from service.core.tenants import TenantStore
from service.core.worker_registry import base_shape

pytestmark = pytest.mark.usefixtures("worker")


def test_the_openai_client_generates_with_an_adapter_as_its_model(
    gateway: str,
    tenants: TenantStore,
    settings: Settings,
    image_bytes: Callable[..., bytes],
    wait_job: Callable[..., dict],
) -> None:
    _, key = tenants.create("openai-user")
    api = httpx.Client(base_url=gateway, headers={"Authorization": f"Bearer {key}"}, timeout=60)
    files = [("images", ("a.png", image_bytes((30, 30, 200)), "image/png"))]
    created = api.post("/v1/adapters", data={"prompt": "a blue square", "steps": 3, "atoms": 16}, files=files).json()
    assert wait_job(api, created["job_id"])["status"] == "succeeded"
    adapter_id = created["adapter_id"]
    base = base_shape(connect(settings.redis_url))
    assert base is not None and base.name and base.sample_size
    client = openai.OpenAI(base_url=f"{gateway}/v1", api_key=key, max_retries=0, timeout=60)

    assert [model.id for model in client.models.list()] == [base.name, adapter_id]

    side = base.sample_size
    through_adapter = client.images.generate(
        model=adapter_id, prompt="a blue square", n=2, size=f"{side}x{side}", response_format="b64_json"
    )
    assert len(through_adapter.data) == 2
    for item in through_adapter.data:
        assert item.b64_json is not None
        image = Image.open(io.BytesIO(base64.b64decode(item.b64_json)))
        assert image.format == "PNG" and image.size == (side, side)

    from_base = client.images.generate(model=base.name, prompt="a blue square")
    assert len(from_base.data) == 1 and from_base.data[0].url is not None
    fetched = api.get(from_base.data[0].url)
    assert fetched.status_code == 200 and fetched.content.startswith(b"\x89PNG")
    # Without a model, the base draws (the client sends none).
    assert len(client.images.generate(prompt="a blue square").data) == 1

    with pytest.raises(openai.NotFoundError) as missing:
        client.images.generate(model="dall-e-3", prompt="a blue square")
    assert missing.value.code == "model_not_found" and "GET /v1/models" in missing.value.message
    with pytest.raises(openai.BadRequestError) as bad_size:
        client.images.generate(model=adapter_id, prompt="x", size="big")
    assert "WIDTHxHEIGHT" in bad_size.value.message
    with pytest.raises(openai.BadRequestError, match="greater than or equal to 16"):
        client.images.generate(model=adapter_id, prompt="x", size="8x8")
    with pytest.raises(openai.BadRequestError, match="n"):
        client.images.generate(model=adapter_id, prompt="x", n=9)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{gateway}/v1", api_key="atk_nope_nope", max_retries=0).models.list()

    # Another tenant cannot name the adapter.
    other_key = tenants.create("openai-neighbour")[1]
    other = openai.OpenAI(base_url=f"{gateway}/v1", api_key=other_key, max_retries=0, timeout=60)
    assert [model.id for model in other.models.list()] == [base.name]
    with pytest.raises(openai.NotFoundError):
        other.images.generate(model=adapter_id, prompt="a blue square")
    api.close()
