"""The gateway's contract: auth, validation with messages that say what to fix, ownership, paging."""

import io
import json
import time
import zipfile
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from httpx import Client as Api
from PIL import Image

from service.app import create_app
from service.core.catalog import AdapterCatalog
from service.core.contract import (
    ACTIVATIONS,
    GUIDANCE_BRANCHES,
    MAX_ATOMS,
    MAX_BLOCKS,
    MAX_COMPOSED,
    SCHEMA_VERSION,
    GenerateParams,
    GenerateResult,
)
from service.core.ids import new_id
from service.core.jobs import JobStore
from service.core.queue import make_celery
from service.core.redis_db import BASE_MODEL_KEY, connect, tenant_streams_key
from service.core.settings import Settings
from service.core.tenants import TenantStore
from service.core.worker_registry import BaseShape, publish_base
from tests.service.conftest import adapter_zip

UNKNOWN_ID = "01ARZ3NDEKTSV4RRFFQ69G5FAV"


def error_of(response: object) -> dict:
    body = response.json()  # type: ignore[attr-defined]
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message"}, body
    return body["error"]


def test_health_docs_and_unknown_routes(gateway: str) -> None:
    with Api(base_url=gateway) as client:
        assert client.get("/healthz").json() == {"status": "ok", "workers": None}
        assert client.get("/docs").status_code == 200
        assert "/v1/generations" in client.get("/openapi.json").json()["paths"]
        response = client.get("/v1/nothing-here")
        assert response.status_code == 404 and "see /docs" in error_of(response)["message"]


def test_openapi_and_allow_headers_tell_every_method_a_path_serves(new_tenant: Callable[[str], Api]) -> None:
    api = new_tenant("methods")
    for path, methods in (
        (f"/v1/adapters/{UNKNOWN_ID}", {"GET", "DELETE"}),
        (f"/v1/jobs/{UNKNOWN_ID}", {"GET", "DELETE"}),
        ("/v1/adapters", {"GET", "POST"}),
    ):
        response = api.request("PATCH", path)
        assert response.status_code == 405, response.text
        assert methods <= set(response.headers["allow"].split(", ")), (path, response.headers["allow"])
        assert "PATCH is not served here" in error_of(response)["message"]
    schema = api.get("/openapi.json").json()
    unauthorised = schema["paths"]["/v1/jobs/{job_id}/events"]["get"]["responses"]["401"]
    assert list(unauthorised["content"]) == ["application/json"], unauthorised
    wait = next(p for p in schema["paths"]["/v1/generations"]["post"]["parameters"] if p["name"] == "wait")
    assert "at most" in wait["description"]
    # An empty cursor is the first page.
    assert api.get("/v1/adapters", params={"cursor": ""}).status_code == 200


def test_readyz_needs_a_live_worker(settings: Settings) -> None:
    # A Redis database no worker heartbeats into: Redis answers, but no worker is alive.
    lonely = settings.model_copy(update={"redis_url": settings.redis_url.rsplit("/", 1)[0] + "/3"})
    with TestClient(create_app(lonely)) as client:
        response = client.get("/readyz")
    assert response.status_code == 503 and "atomtune worker" in error_of(response)["message"]


def test_auth_rejects_missing_wrong_and_revoked_keys(gateway: str, tenants: TenantStore) -> None:
    with Api(base_url=gateway) as client:
        missing = client.get("/v1/adapters")
        assert missing.status_code == 401 and "Bearer" in error_of(missing)["message"]
        assert missing.headers["www-authenticate"] == "Bearer"
        for key in ("nonsense", "atk_0000_secret", "Basic abc"):
            response = client.get("/v1/adapters", headers={"Authorization": f"Bearer {key}"})
            assert response.status_code == 401, key
        tenant, key = tenants.create("to-revoke")
        headers = {"Authorization": f"Bearer {key}"}
        assert client.get("/v1/adapters", headers=headers).status_code == 200
        # A right key id with a wrong secret fails like an unknown key.
        assert client.get("/v1/adapters", headers={"Authorization": f"Bearer {key[:-2]}xx"}).status_code == 401
        tenants.revoke(tenant.id)
        assert client.get("/v1/adapters", headers=headers).status_code == 401


def noise_png(side: int) -> bytes:
    pixels = np.random.default_rng(0).integers(0, 256, (side, side, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def gif_bytes() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, format="GIF")
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("files", "data", "status", "says"),
    [
        ([], {"prompt": "p"}, 422, "images"),
        ("eleven", {"prompt": "p"}, 422, "1-10 images"),
        ([("images", ("t.txt", b"hello", "text/plain"))], {"prompt": "p"}, 415, "PNG, JPEG or WebP"),
        ([("images", ("g.gif", gif_bytes(), "image/gif"))], {"prompt": "p"}, 415, "is GIF"),
        ([("images", ("big.png", noise_png(200), "image/png"))], {"prompt": "p"}, 413, "limit is 100000 bytes"),
        ([("images", ("wide.png", Image.new("RGB", (300, 300)), "image/png"))], {"prompt": "p"}, 422, "300x300"),
        ("one", {}, 422, "prompt: Field required"),
        ("one", {"prompt": "p", "steps": 0}, 422, "steps: Input should be greater than or equal to 1"),
        ("one", {"prompt": "p", "activation": "tanh"}, 422, "activation"),
        ("one", {"prompt": "p", "resolution": 50}, 422, "multiple of 16"),
        ("one", {"prompt": "p", "learning_rate": 5}, 422, "learning_rate"),
        ("one", {"prompt": "p", "captions": ["a", "b"]}, 422, "one caption per image: 2 captions for 1 images"),
        ("one", {"prompt": "p", "captions": [""]}, 422, "captions.0: String should have at least 1 character"),
        ("one", {"prompt": "p", "batch_size": 17}, 422, "batch_size"),
        # Refused rather than ignored or coerced: a misspelt field, a count that is not a whole number, NUL.
        ("one", {"prompt": "p", "stepz": "3"}, 422, "stepz: Extra inputs are not permitted"),
        ("one", {"prompt": "p", "steps": "3.0"}, 422, "steps: Input should be a whole number"),
        ("one", {"prompt": "p", "steps": "true"}, 422, "steps: Input should be a whole number"),
        ("one", {"prompt": "p\x00"}, 422, "prompt: Input should not contain control characters"),
        ("one", {"prompt": "p", "captions": ["a\x00"]}, 422, "captions.0: Input should not contain control"),
    ],
)
def test_training_uploads_are_validated(
    new_tenant: Callable[[str], Api],
    image_bytes: Callable[..., bytes],
    files: object,
    data: dict,
    status: int,
    says: str,
) -> None:
    api = new_tenant("uploads")
    one = [("images", ("a.png", image_bytes((1, 2, 3)), "image/png"))]
    if files == "one":
        files = one
    elif files == "eleven":
        files = one * 11
    else:
        files = [
            (field, (name, _encode(content), kind))
            for field, (name, content, kind) in files  # type: ignore[union-attr]
        ]
    response = api.post("/v1/adapters", data=data, files=files or None)
    assert response.status_code == status, response.text
    assert says in error_of(response)["message"]
    assert api.get("/v1/adapters").json()["items"] == []


def _encode(content: object) -> bytes:
    if isinstance(content, Image.Image):
        buffer = io.BytesIO()
        content.save(buffer, format="PNG")
        return buffer.getvalue()
    assert isinstance(content, bytes)
    return content


@pytest.mark.parametrize(
    ("body", "params", "status", "says"),
    [
        ({"prompt": "p", "num_images": 5}, {}, 422, "num_images: Input should be less than or equal to 4"),
        ({"prompt": "p", "density": 0.5}, {}, 422, "density applies to an adapter"),
        ({"prompt": "p", "top_atoms": 3}, {}, 422, "top_atoms applies to an adapter"),
        ({"prompt": "p", "adapter_guidance": "both"}, {}, 422, "adapter_guidance applies to an adapter"),
        ({"prompt": "p", "adapter_guidance": "positive"}, {}, 422, "adapter_guidance: Input should be"),
        ({"prompt": "p", "adapter_id": UNKNOWN_ID}, {}, 404, f"adapter '{UNKNOWN_ID}' does not exist"),
        ({"prompt": "p", "adapter_id": "../../etc"}, {}, 404, "does not exist"),
        ({"prompt": "p", "width": 100}, {}, 422, "width must be a multiple of 16"),
        ({"prompt": "p", "height": 2048}, {}, 422, "at most 1024"),
        ({"prompt": "p", "atom_masks": {}}, {}, 422, "atom_masks: Extra inputs are not permitted"),
        ({"prompt": ""}, {}, 422, "prompt: String should have at least 1 character"),
        ({"prompt": "p\u0000"}, {}, 422, "prompt: Input should not contain control characters"),
        ({"prompt": "p", "negative_prompt": "\u0007"}, {}, 422, "negative_prompt: Input should not contain"),
        ({"prompt": "p", "steps": True}, {}, 422, "steps: Input should be a valid integer"),
        ({"prompt": "p", "num_images": 2.0}, {}, 422, "num_images: Input should be a valid integer"),
        ({"prompt": "p", "seed": "7"}, {}, 422, "seed: Input should be a valid integer"),
        ({"prompt": "p"}, {"wait": 600}, 422, "wait must be at most 60 seconds"),
        ({"prompt": "p", "atom_mask": {"mode": "keep", "blocks": {}}}, {}, 422, "atom_mask.blocks"),
        (
            {"prompt": "p", "atom_mask": {"mode": "keep", "blocks": {str(n): [0] for n in range(MAX_BLOCKS + 1)}}},
            {},
            422,
            f"atom_mask.blocks: Dictionary should have at most {MAX_BLOCKS} items",
        ),
        (
            {"prompt": "p", "atom_mask": {"mode": "keep", "blocks": {"0": [0] * (MAX_ATOMS + 1)}}},
            {},
            422,
            f"atom_mask.blocks.0: List should have at most {MAX_ATOMS} items",
        ),
    ],
)
def test_generation_requests_are_validated(
    new_tenant: Callable[[str], Api], body: dict, params: dict, status: int, says: str
) -> None:
    response = new_tenant("generations").post("/v1/generations", json=body, params=params)
    assert response.status_code == status, response.text
    assert says in error_of(response)["message"]


def test_atom_mask_bounds_and_activations_are_the_engines() -> None:
    from adapters.persistence import MAX_BLOCKS as ENGINE_MAX_BLOCKS
    from adapters.sparse_dictionary.config import ACTIVATIONS as ENGINE_ACTIVATIONS
    from adapters.sparse_dictionary.config import MAX_ATOMS as ENGINE_MAX_ATOMS
    from adapters.sparse_dictionary.model import GUIDANCE_BRANCHES as ENGINE_GUIDANCE_BRANCHES

    assert (MAX_BLOCKS, MAX_ATOMS) == (ENGINE_MAX_BLOCKS, ENGINE_MAX_ATOMS)
    from adapters import MAX_COMPOSED as ENGINE_MAX_COMPOSED

    assert ACTIVATIONS == ENGINE_ACTIVATIONS
    assert GUIDANCE_BRANCHES == ENGINE_GUIDANCE_BRANCHES
    assert MAX_COMPOSED == ENGINE_MAX_COMPOSED


@pytest.fixture
def ready_adapter(settings: Settings) -> Callable[[str], str]:
    """A ready adapter record (16 atoms, blocks 0 and 1) owned by the tenant, without training one."""
    catalog = AdapterCatalog(connect(settings.redis_url))

    def make(tenant_id: str) -> str:
        adapter_id = new_id()
        config = {"num_atoms": 16, "density": 0.25, "activation": "topk"}
        catalog.create(adapter_id, tenant_id, "p", "imported", config)
        assert catalog.mark_ready(adapter_id, config, [0, 1], metrics={})
        return adapter_id

    return make


def test_atom_masks_refuse_repeated_atoms_and_are_stored_sorted(
    new_tenant: Callable[[str], Api], ready_adapter: Callable[[str], str], settings: Settings
) -> None:
    api = new_tenant("masks")
    adapter_id = ready_adapter(api.tenant_id)  # type: ignore[attr-defined]
    body = {"prompt": "p", "adapter_id": adapter_id, "atom_mask": {"mode": "drop", "blocks": {"1": [5, 3, 5]}}}
    repeated = api.post("/v1/generations", json=body)
    assert repeated.status_code == 422 and "atoms [5] are listed more than once" in error_of(repeated)["message"]

    body["atom_mask"]["blocks"] = {"1": [9, 2, 7]}  # type: ignore[index]
    accepted = api.post("/v1/generations", json=body)
    assert accepted.status_code == 202, accepted.text
    job_id = accepted.json()["job_id"]
    jobs = JobStore(connect(settings.redis_url))
    job = jobs.get(job_id)
    assert job is not None and job.params["adapters"][0]["atom_mask"]["blocks"] == {"1": [2, 7, 9]}
    assert GenerateParams.parse(job.params).adapters[0].atom_mask.blocks == {1: [2, 7, 9]}  # type: ignore[union-attr]
    jobs.cancel(job_id)


def test_composed_adapters_are_checked_each_and_stored_in_order(
    new_tenant: Callable[[str], Api], ready_adapter: Callable[[str], str], settings: Settings
) -> None:
    api, neighbour = new_tenant("composed"), new_tenant("composed-neighbour")
    mine = [ready_adapter(api.tenant_id) for _ in range(MAX_COMPOSED + 1)]  # type: ignore[attr-defined]
    theirs = ready_adapter(neighbour.tenant_id)  # type: ignore[attr-defined]
    cases = [
        ({"adapter_id": mine[0], "adapters": [{"id": mine[1]}]}, 422, "give adapter_id inside each of adapters"),
        ({"top_atoms": 2, "adapters": [{"id": mine[1]}]}, 422, "give top_atoms inside each of adapters"),
        ({"adapters": [{"id": mine[0]}, {"id": mine[0], "scale": 2}]}, 422, "more than once"),
        ({"adapters": [{"id": a} for a in mine]}, 422, f"at most {MAX_COMPOSED} items"),
        ({"adapters": []}, 422, "at least 1 item"),
        ({"adapters": [{"id": mine[0], "scale": 2.5}]}, 422, "adapters.0.scale"),
        ({"adapters": [{"id": mine[0]}, {"id": mine[1], "top_atoms": 17}]}, 422, "at most the adapter's 16 atoms"),
        ({"adapters": [{"id": mine[0]}, {"id": theirs}]}, 404, f"adapter '{theirs}' does not exist"),
        ({"adapters": [{"id": mine[0], "atom_mask": {"mode": "keep", "blocks": {"7": [1]}}}]}, 422, "block 7"),
    ]
    for body, status, says in cases:
        response = api.post("/v1/generations", json={"prompt": "p", **body})
        assert response.status_code == status, (body, response.text)
        assert says in error_of(response)["message"], (body, response.text)

    composed = [
        {"id": mine[1], "scale": -0.5, "density": 0.5},
        {"id": mine[0], "atom_mask": {"mode": "drop", "blocks": {"0": [3]}}},
    ]
    accepted = api.post("/v1/generations", json={"prompt": "p", "adapters": composed})
    assert accepted.status_code == 202, accepted.text
    jobs = JobStore(connect(settings.redis_url))
    job = jobs.get(accepted.json()["job_id"])
    assert job is not None and job.adapter_id == mine[1]
    uses = GenerateParams.parse(job.params).adapters
    assert [(u.adapter_id, u.scale, u.density) for u in uses] == [(mine[1], -0.5, 0.5), (mine[0], 1.0, None)]
    assert uses[1].atom_mask is not None and uses[1].atom_mask.blocks == {0: [3]}
    jobs.cancel(job.id)


def test_a_result_written_by_a_worker_of_another_version_is_refused_with_a_clear_error(
    new_tenant: Callable[[str], Api],
    settings: Settings,
    generate_params: Callable[..., GenerateParams],
    stand_in_worker: str,
) -> None:
    api = new_tenant("result-version")
    jobs = JobStore(connect(settings.redis_url))
    job_id = new_id()
    jobs.create(job_id, api.tenant_id, generate_params(steps=1), max_active=4)  # type: ignore[attr-defined]
    _, attempt = jobs.claim(job_id, pid=0, max_attempts=1, worker=stand_in_worker)
    result = GenerateResult(image_count=1, seed=0, adapter_tier=None, adapters=[], batch_size=2)
    assert jobs.finish(job_id, attempt, "succeeded", result.model_copy(update={"schema_version": 99})) == "ok"
    response = api.get(f"/v1/jobs/{job_id}")
    assert response.status_code == 500 and error_of(response)["code"] == "version_mismatch"
    assert f"reads schema {SCHEMA_VERSION} only" in error_of(response)["message"]


def test_unknown_and_malformed_ids_answer_404(new_tenant: Callable[[str], Api]) -> None:
    api = new_tenant("ids")
    for url in (f"/v1/jobs/{UNKNOWN_ID}", "/v1/jobs/not-an-id", f"/v1/adapters/{UNKNOWN_ID}/atoms"):
        response = api.get(url)
        assert response.status_code == 404 and error_of(response)["code"] == "not_found", url
    assert api.get("/v1/adapters", params={"cursor": "nope"}).status_code == 422


def test_adapters_page_newest_first_and_jobs_are_bounded_per_tenant(
    new_tenant: Callable[[str], Api], image_bytes: Callable[..., bytes]
) -> None:
    api = new_tenant("paging")
    files = [("images", ("a.png", image_bytes((9, 9, 9)), "image/png"))]
    created = []
    for _ in range(4):  # the tests' limit of active jobs per tenant
        response = api.post("/v1/adapters", data={"prompt": "p", "atoms": 16, "steps": 5000}, files=files)
        assert response.status_code == 202, response.text
        created.append(response.json())
    refused = api.post("/v1/generations", json={"prompt": "p"})
    assert refused.status_code == 429 and "cancel" in error_of(refused)["message"]
    assert refused.headers["retry-after"] == "5"
    for item in created:
        assert api.delete(f"/v1/jobs/{item['job_id']}").status_code == 202

    ids = [item["adapter_id"] for item in reversed(created)]
    first = api.get("/v1/adapters", params={"limit": 3}).json()
    assert [a["id"] for a in first["items"]] == ids[:3] and first["next_cursor"] == ids[2]
    second = api.get("/v1/adapters", params={"limit": 3, "cursor": first["next_cursor"]}).json()
    assert [a["id"] for a in second["items"]] == ids[3:] and second["next_cursor"] is None
    assert api.get("/v1/adapters", params={"limit": 101}).status_code == 422


def _zip(entries: dict[str, bytes], compression: int = zipfile.ZIP_STORED) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=compression) as archive:
        for name, content in entries.items():
            archive.writestr(name, content)
    return buffer.getvalue()


ADAPTER_ENTRIES = {"adapter_config.json": b"{}" * 500, "adapter_model.safetensors": b"x" * 1000}


def _encrypted_zip() -> bytes:
    """A zip whose entries claim to be encrypted (general purpose flag bit 0)."""
    data = bytearray(_zip(ADAPTER_ENTRIES))
    for signature, offset in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)):
        start = 0
        while (start := data.find(signature, start)) != -1:
            data[start + offset] |= 1
            start += 4
    return bytes(data)


def _corrupt_deflated_zip() -> bytes:
    data = bytearray(_zip(ADAPTER_ENTRIES, zipfile.ZIP_DEFLATED))
    info = zipfile.ZipFile(io.BytesIO(bytes(data))).infolist()[0]
    payload = info.header_offset + 30 + len(info.filename.encode())
    data[payload : payload + info.compress_size] = b"\xff" * info.compress_size
    return bytes(data)


@pytest.mark.parametrize(
    ("content", "says"),
    [
        (b"not a zip", "not a zip file"),
        (_zip({"adapter_config.json": b"{}"}), "must hold exactly"),
        (_zip({"../adapter_config.json": b"{}", "adapter_model.safetensors": b""}), "must hold exactly"),
        (_encrypted_zip(), "is encrypted; send the zip unencrypted"),
        (_zip(ADAPTER_ENTRIES, zipfile.ZIP_BZIP2), "uses compression method 12; store or deflate it"),
        (_corrupt_deflated_zip(), "'adapter_config.json' in the zip is corrupt"),
    ],
)
def test_import_zips_are_checked_before_unpacking(new_tenant: Callable[[str], Api], content: bytes, says: str) -> None:
    response = new_tenant("imports").post("/v1/adapters/import", files={"file": ("a.zip", content)})
    assert response.status_code == 422, response.text
    assert says in error_of(response)["message"]


def test_unparseable_bodies_answer_400_saying_what_they_are_not(new_tenant: Callable[[str], Api]) -> None:
    api = new_tenant("garbled")
    not_json = api.post("/v1/generations", content=b"\x17\xff\x1a\xfe", headers={"content-type": "application/json"})
    assert not_json.status_code == 400, not_json.text
    assert error_of(not_json) == {
        "code": "malformed_body",
        "message": "the body is not valid application/json; see /docs for what this route takes",
    }
    broken = api.post(
        "/v1/adapters/import",
        content=b"--b\r\n\x00\r\n\r\n",
        headers={"content-type": "multipart/form-data; boundary=b"},
    )
    assert broken.status_code == 400 and error_of(broken)["code"] == "malformed_body", broken.text
    assert "not valid multipart/form-data" in error_of(broken)["message"]


def test_request_bodies_are_bounded(new_tenant: Callable[[str], Api], settings: Settings) -> None:
    api = new_tenant("body")
    huge = b"x" * (settings.max_request_bytes + 1)
    response = api.post("/v1/adapters", files={"images": ("a.png", huge, "image/png")}, data={"prompt": "p"})
    assert response.status_code == 413 and "send fewer or smaller files" in error_of(response)["message"]

    def chunks() -> Iterator[bytes]:  # no Content-Length: the limit cuts the stream off
        for _ in range(settings.max_request_bytes // 2**20 + 2):
            yield b"x" * 2**20

    streamed = api.post("/v1/generations", content=chunks(), headers={"content-type": "application/json"})
    assert streamed.status_code == 413 and error_of(streamed)["code"] == "content_too_large"
    # JSON is parsed whole in memory: its bound is far below the upload's, with or without a content type.
    big_json = b'{"prompt": "' + b"x" * settings.max_json_bytes + b'"}'
    assert settings.max_json_bytes < settings.max_request_bytes
    for headers in ({"content-type": "application/json"}, {}):
        refused = api.post("/v1/generations", content=big_json, headers=headers)
        assert refused.status_code == 413, refused.text
        assert f"over {settings.max_json_bytes} bytes; send a smaller JSON body" in error_of(refused)["message"]


def test_event_streams_and_waits_are_bounded_per_tenant(
    new_tenant: Callable[[str], Api],
    settings: Settings,
    wait_for: Callable[..., None],
    generate_params: Callable[..., GenerateParams],
) -> None:
    api, other = new_tenant("streams"), new_tenant("streams-other")
    jobs = JobStore(connect(settings.redis_url))
    # Never enqueued, so it stays queued and its streams stay open until it is cancelled.
    job_id, other_job = new_id(), new_id()
    jobs.create(job_id, api.tenant_id, generate_params(steps=1), max_active=1)  # type: ignore[attr-defined]
    jobs.create(other_job, other.tenant_id, generate_params(steps=1), max_active=1)  # type: ignore[attr-defined]
    limit = Settings().max_streams_per_tenant
    with ExitStack() as streams:
        opened = [streams.enter_context(api.stream("GET", f"/v1/jobs/{job_id}/events")) for _ in range(limit)]
        assert all(response.status_code == 200 for response in opened)
        refused = api.get(f"/v1/jobs/{job_id}/events")
        assert refused.status_code == 429 and error_of(refused)["code"] == "too_many_streams"
        assert refused.headers["retry-after"] == "1"
        assert f"you have {limit} event streams or waits open" in error_of(refused)["message"]
        waiting = api.post("/v1/generations", json={"prompt": "p"}, params={"wait": 1})
        assert waiting.status_code == 429 and "close one" in error_of(waiting)["message"]
        assert jobs.active_count(api.tenant_id) == 1  # type: ignore[attr-defined]  # the refused wait queued nothing
        # A client that goes away gives its slot back.
        opened.pop().close()
        key = tenant_streams_key(api.tenant_id)  # type: ignore[attr-defined]
        db = connect(settings.redis_url)
        wait_for(lambda: db.get(key) == str(limit - 1), 20, "the closed stream's slot to be given back")
        # Another tenant is not affected.
        with other.stream("GET", f"/v1/jobs/{other_job}/events") as response:
            assert response.status_code == 200
        assert api.delete(f"/v1/jobs/{job_id}").status_code == 202
        for response in opened:
            for _ in response.iter_lines():  # each stream ends with the job
                pass
    jobs.cancel(other_job)
    # Every slot is given back once its stream ended.
    wait_for(lambda: db.get(key) == "0", 10, "the stream slots to be given back")
    with api.stream("GET", f"/v1/jobs/{job_id}/events") as response:
        assert response.status_code == 200


def test_an_event_stream_outlasts_a_quiet_spell_longer_than_a_socket_timeout(
    new_tenant: Callable[[str], Api], settings: Settings, generate_params: Callable[..., GenerateParams]
) -> None:
    """redis-py 8 reads with a 5 s socket timeout by default; a blocking XREAD must outlast it."""
    api = new_tenant("quiet")
    jobs = JobStore(connect(settings.redis_url))
    job_id = new_id()  # never enqueued: nothing happens to it until it is cancelled
    jobs.create(job_id, api.tenant_id, generate_params(steps=1), max_active=1)  # type: ignore[attr-defined]
    with api.stream("GET", f"/v1/jobs/{job_id}/events") as response:
        lines = response.iter_lines()
        assert next(line for line in lines if line.startswith("data: "))
        time.sleep(7)
        assert api.delete(f"/v1/jobs/{job_id}").status_code == 202
        rest = list(lines)
    assert json.loads([line for line in rest if line.startswith("data: ")][-1][6:])["status"] == "cancelled"


def test_imports_and_training_requests_are_checked_against_the_served_base(settings: Settings, tmp_path: Path) -> None:
    # A Redis database of its own, so that what the test's worker publishes does not interfere.
    isolated = settings.model_copy(update={"redis_url": settings.redis_url.rsplit("/", 1)[0] + "/4"})
    db = connect(isolated.redis_url)
    db.delete(BASE_MODEL_KEY)
    _, key = TenantStore(db).create(f"base-{new_id()}")
    base = BaseShape(fingerprint="pixart-test", num_blocks=2, num_heads=4, in_features=32, out_features=32)
    good = adapter_zip(tmp_path, base.fingerprint, 8, 32, 2)
    with TestClient(create_app(isolated), headers={"Authorization": f"Bearer {key}"}) as client:

        def upload(content: bytes) -> object:
            return client.post("/v1/adapters/import", files={"file": ("a.zip", content)})

        unknown = upload(good)  # an import of a well-formed zip before any worker has loaded the base
        assert unknown.status_code == 503 and "no worker has loaded the base model" in error_of(unknown)["message"]

        publish_base(db, base)
        for content, says in [
            (_zip({"adapter_config.json": b"{nope", "adapter_model.safetensors": b"x"}), "adapter_config.json is not"),
            (_zip({**ADAPTER_ENTRIES, "adapter_config.json": b" " * 70_000}), "adapter_config.json is larger than"),
            (_zip({**ADAPTER_ENTRIES, "adapter_config.json": b"[]"}), "adapter_config.json must hold a JSON object"),
            (adapter_zip(tmp_path, "pixart-other", 8, 32, 2), "made for base 'pixart-other'"),
            (adapter_zip(tmp_path, base.fingerprint, 8, 16, 2), "in_features=16, but the served base model has 32"),
            (adapter_zip(tmp_path, base.fingerprint, 8, 32, 3), "num_blocks=3, but the served base model has 2"),
            (adapter_zip(tmp_path, base.fingerprint, 6, 32, 2), "multiple of the base model's 4 attention heads"),
        ]:
            response = upload(content)
            message = error_of(response)["message"]
            assert response.status_code == 422 and says in message, response.text
            # The file is named, not where the server unpacked it.
            assert str(isolated.data_dir) not in message and ".tmp-" not in message, message
        assert upload(good).status_code == 201

        image = [("images", ("a.png", noise_png(16), "image/png"))]
        refused = client.post("/v1/adapters", data={"prompt": "p", "atoms": 18}, files=image)
        assert refused.status_code == 422
        assert "atoms (18) must be a multiple of the base model's 4 attention heads" in error_of(refused)["message"]
        assert len(client.get("/v1/adapters").json()["items"]) == 1  # only the good import


@pytest.mark.parametrize(
    ("overrides", "body", "accepted", "says"),
    [
        ({}, {"width": 64, "height": 64, "num_images": 4, "steps": 100}, True, ""),
        ({}, {"width": 128}, False, "width must be a multiple of 16 and at most 64"),
        ({"max_resolution": 256}, {"width": 128, "height": 128, "steps": 100}, True, ""),
        (
            {"max_resolution": 256},
            {"width": 256, "height": 256, "num_images": 4, "steps": 100},
            False,
            "costs 6400 image-steps at the base's 64 px (images x steps x pixels); the limit is 400",
        ),
    ],
)
def test_sizes_and_costs_follow_the_served_base(
    settings: Settings, overrides: dict, body: dict, accepted: bool, says: str
) -> None:
    # A database of its own, where a 64 px base is published; no worker takes its jobs.
    isolated = settings.model_copy(update={"redis_url": settings.redis_url.rsplit("/", 1)[0] + "/5", **overrides})
    db = connect(isolated.redis_url)
    publish_base(db, BaseShape("pixart-64", num_blocks=2, num_heads=4, in_features=32, out_features=32, sample_size=64))
    _, key = TenantStore(db).create(f"sizes-{new_id()}")
    with TestClient(create_app(isolated), headers={"Authorization": f"Bearer {key}"}) as client:
        response = client.post("/v1/generations", json={"prompt": "p", **body})
    if accepted:
        assert response.status_code == 202, response.text
    else:
        assert response.status_code == 422 and says in error_of(response)["message"], response.text


def test_a_job_that_cannot_be_queued_fails_and_leaves_nothing_behind(
    settings: Settings, image_bytes: Callable[..., bytes]
) -> None:
    isolated = settings.model_copy(update={"redis_url": settings.redis_url.rsplit("/", 1)[0] + "/5"})
    db = connect(isolated.redis_url)
    tenant, key = TenantStore(db).create(f"queue-down-{new_id()}")
    # A broker nothing listens on (port 1 is privileged): sending a task fails as when the queue is down.
    broker_down = settings.model_copy(update={"redis_url": "redis://127.0.0.1:1/0"})
    with TestClient(create_app(isolated), headers={"Authorization": f"Bearer {key}"}) as client:
        services = client.app.state.services  # type: ignore[attr-defined]
        services.celery = make_celery(broker_down)
        generation = client.post("/v1/generations", json={"prompt": "p"})
        image = [("images", ("a.png", image_bytes((1, 2, 3)), "image/png"))]
        training = client.post("/v1/adapters", data={"prompt": "p", "atoms": 16}, files=image)
        assert client.get("/v1/adapters").json()["items"] == []
    for response in (generation, training):
        assert response.status_code == 503 and error_of(response)["code"] == "unavailable", response.text
    # Both jobs were recorded, then failed: neither holds a slot of the tenant's quota.
    jobs = JobStore(db)
    ids = [key.split(":")[2] for key in db.scan_iter("atomtune:job:*") if not key.endswith(":events")]
    mine = [job for job in map(jobs.get, ids) if job is not None and job.tenant_id == tenant.id]
    assert sorted(job.kind for job in mine) == ["finetune", "generate"]
    assert all(job.status == "failed" and job.error_code == "unavailable" for job in mine)
    assert jobs.active_count(tenant.id) == 0
    # The fine-tune's uploads went with its adapter record.
    assert not any((settings.data_dir / "tenants" / tenant.id).glob("*/*"))
