"""A tenant's whole path through the real parts: HTTP -> gateway -> Redis -> worker -> storage -> HTTP."""

import io
import subprocess
import sys
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from httpx import Client as Api
from PIL import Image

pytestmark = pytest.mark.usefixtures("worker")
REPO = Path(__file__).resolve().parents[2]


def generate(api: Api, wait_job: Callable[..., dict], **body: object) -> dict:
    request = {"prompt": "a photo of a red square", "steps": 2, "seed": 7, **body}
    response = api.post("/v1/generations", json=request, params={"wait": 60})
    assert response.status_code in (200, 202), response.text
    job = response.json()["job"] or wait_job(api, response.json()["job_id"])
    assert job["status"] == "succeeded", job
    return job


def pixels(api: Api, url: str) -> np.ndarray:
    response = api.get(url)
    assert response.status_code == 200
    assert response.headers["content-type"] == "image/png"
    return np.asarray(Image.open(io.BytesIO(response.content)), dtype=np.int16)


def test_tenant_trains_generates_downloads_and_other_tenants_see_nothing(
    new_tenant: Callable[[str], Api],
    wait_job: Callable[..., dict],
    image_bytes: Callable[..., bytes],
    service_env: dict[str, str],
    gateway: str,
) -> None:
    created = subprocess.run(
        [sys.executable, "-m", "service.cli", "tenant", "create", "e2e-owner"],
        env=service_env,
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    )
    key = next(line.split(": ", 1)[1] for line in created.stdout.splitlines() if line.startswith("key: "))
    owner = Api(base_url=gateway, headers={"Authorization": f"Bearer {key}"}, timeout=60)
    other = new_tenant("intruder")
    assert owner.get("/readyz").status_code == 200

    files = [
        ("images", ("a.png", image_bytes((200, 30, 30)), "image/png")),
        ("images", ("b.jpg", image_bytes((190, 40, 20), fmt="JPEG"), "image/jpeg")),
        ("images", ("c.webp", image_bytes((210, 20, 40), fmt="WEBP"), "image/webp")),
    ]
    form = {"prompt": "a photo of a red square", "atoms": 16, "density": 0.25, "steps": 5, "learning_rate": 0.02}
    # One caption per image: the concept in the context each image shows.
    captions = ["a red square on grey", "a red square on white", "a red square in the dark"]
    response = owner.post("/v1/adapters", data={**form, "seed": 1, "captions": captions}, files=files)
    assert response.status_code == 202, response.text
    adapter_id, job_id = response.json()["adapter_id"], response.json()["job_id"]

    job = wait_job(owner, job_id)
    assert job["status"] == "succeeded", job
    assert job["kind"] == "finetune" and job["result"]["adapter_id"] == adapter_id
    assert job["progress"] == {"step": 5, "total": 5, "loss": job["progress"]["loss"]}
    assert job["started_at"] and job["finished_at"] and job["queued_at"]

    adapter = owner.get(f"/v1/adapters/{adapter_id}").json()
    assert adapter["status"] == "ready"
    assert adapter["config"]["num_atoms"] == 16 and adapter["blocks"] == [0, 1]
    assert adapter["metrics"]["steps"] == 5 and len(adapter["metrics"]["loss_curve"]) == 5
    assert [a["id"] for a in owner.get("/v1/adapters").json()["items"]] == [adapter_id]

    atoms = owner.get(f"/v1/adapters/{adapter_id}/atoms").json()
    assert [block["block"] for block in atoms["blocks"]] == [0, 1]
    scores = [a["importance"] for a in atoms["blocks"][0]["atoms"]]
    assert len(scores) == 16 and scores == sorted(scores, reverse=True)
    top = [a["atom"] for a in atoms["blocks"][0]["atoms"][:4]]

    base = generate(owner, wait_job)
    tuned = generate(owner, wait_job, adapter_id=adapter_id)
    # The fine-tuning worker trained it; the generation worker read it from storage, once.
    assert tuned["result"]["adapter_tier"] == "storage"
    sparser = generate(owner, wait_job, adapter_id=adapter_id, density=0.0625)
    assert sparser["result"]["adapter_tier"] == "device"
    # Alone in the worker, a generation's batch is its own two rows (guidance doubles its image).
    assert sparser["result"]["batch_size"] == 2
    masked = generate(owner, wait_job, adapter_id=adapter_id, atom_mask={"mode": "drop", "blocks": {"0": top}})
    core = generate(owner, wait_job, adapter_id=adapter_id, top_atoms=2)
    jobs = {"base": base, "tuned": tuned, "sparser": sparser, "masked": masked, "core": core}
    images = {name: pixels(owner, job["result"]["images"][0]) for name, job in jobs.items()}
    assert images["base"].shape == (64, 64, 3)
    names = list(images)
    for i, first in enumerate(names):
        for second in names[i + 1 :]:
            assert np.abs(images[first] - images[second]).max() > 0, f"{first} and {second} are identical"

    download = owner.get(f"/v1/adapters/{adapter_id}/download")
    assert download.status_code == 200 and download.headers["content-type"] == "application/zip"
    assert sorted(zipfile.ZipFile(io.BytesIO(download.content)).namelist()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]

    # Another tenant's ids answer exactly like missing ones, on every route.
    image_url = tuned["result"]["images"][0]
    for method, url in [
        ("GET", f"/v1/adapters/{adapter_id}"),
        ("GET", f"/v1/adapters/{adapter_id}/atoms"),
        ("GET", f"/v1/adapters/{adapter_id}/download"),
        ("DELETE", f"/v1/adapters/{adapter_id}"),
        ("GET", f"/v1/jobs/{job_id}"),
        ("GET", f"/v1/jobs/{job_id}/events"),
        ("DELETE", f"/v1/jobs/{tuned['id']}"),
        ("GET", image_url),
    ]:
        response = other.request(method, url)
        assert response.status_code == 404, (method, url, response.text)
        assert response.json()["error"]["code"] == "not_found"
    stolen = other.post("/v1/generations", json={"prompt": "x", "adapter_id": adapter_id})
    assert stolen.status_code == 404
    assert other.get("/v1/adapters").json()["items"] == []

    # The downloaded zip imports back as an equal adapter: same image for the same request.
    imported = owner.post("/v1/adapters/import", files={"file": ("a.zip", download.content, "application/zip")})
    assert imported.status_code == 201, imported.text
    assert imported.json()["status"] == "ready" and imported.json()["source"] == "imported"
    again = generate(owner, wait_job, adapter_id=imported.json()["id"])
    assert again["result"]["adapter_tier"] == "storage"
    assert np.array_equal(pixels(owner, again["result"]["images"][0]), images["tuned"])

    assert owner.delete(f"/v1/adapters/{adapter_id}").status_code == 204
    assert owner.get(f"/v1/adapters/{adapter_id}").status_code == 404
    owner.close()

    # Uploads, adapters (trained and imported) and outputs are the service's alone: no group or
    # other permission anywhere in the data dir.
    data_dir = Path(service_env["ATOMTUNE_DATA_DIR"])
    written = [data_dir, *data_dir.rglob("*")]
    assert len(written) > 10, written
    shared = [f"{path} {path.stat().st_mode & 0o777:o}" for path in written if path.stat().st_mode & 0o077]
    assert shared == [], shared
