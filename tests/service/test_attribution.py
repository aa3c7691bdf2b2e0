"""Attribution maps through the service: where each of an adapter's most important atoms acts in a
generated image, as JSON grids and PNG overlays, owner-only; masking an atom takes its map's mass
out of the adapter's effect."""

import io
from collections.abc import Callable

import pytest
from httpx import Client as Api
from PIL import Image

pytestmark = pytest.mark.usefixtures("worker")
TOP = 2


def _mass(grids: list[list[list[float]]]) -> float:
    return sum(value for grid in grids for row in grid for value in row)


def test_attribution_maps_show_where_atoms_act_and_masking_removes_them(
    new_tenant: Callable[[str], Api], wait_job: Callable[..., dict], image_bytes: Callable[..., bytes]
) -> None:
    api, other = new_tenant("attributed"), new_tenant("attribution-neighbour")
    files = [("images", (f"{i}.png", image_bytes((200, 40 * i, 30)), "image/png")) for i in range(2)]
    form = {"prompt": "a red square", "steps": 30, "atoms": 16, "learning_rate": 0.02, "seed": 1}
    created = api.post("/v1/adapters", data=form, files=files).json()
    assert wait_job(api, created["job_id"])["status"] == "succeeded"
    adapter_id = created["adapter_id"]
    ranking = api.get(f"/v1/adapters/{adapter_id}/atoms").json()["blocks"]

    def generate(**options: object) -> tuple[dict, dict]:
        body = {"prompt": "a red square", "steps": 4, "seed": 5, "num_images": 2, "adapter_id": adapter_id}
        response = api.post("/v1/generations", json={**body, "attribution": TOP, **options}, params={"wait": 60})
        job = response.json()["job"]
        assert job is not None and job["status"] == "succeeded", response.text
        assert job["result"]["attribution"] == f"/v1/jobs/{job['id']}/attribution"
        return job, api.get(job["result"]["attribution"]).json()

    job, maps = generate()
    rows, columns = maps["grid"]
    assert [entry["block"] for entry in maps["blocks"]] == [entry["block"] for entry in ranking]
    for entry, ranked in zip(maps["blocks"], ranking, strict=True):
        assert [atom["atom"] for atom in entry["atoms"]] == [atom["atom"] for atom in ranked["atoms"][:TOP]]
        assert len(entry["total"]) == 2 and all(
            len(grid) == rows and len(grid[0]) == columns for grid in entry["total"]
        )
        for atom in entry["atoms"]:
            assert len(atom["maps"]) == 2
            # An atom's part of the update is within the whole update, token by token.
            for atom_grid, total_grid in zip(atom["maps"], entry["total"], strict=True):
                for atom_row, total_row in zip(atom_grid, total_grid, strict=True):
                    assert all(0 <= a <= t + 1e-6 for a, t in zip(atom_row, total_row, strict=True))
        assert _mass(entry["total"]) > 0

    block = maps["blocks"][0]
    top_atom = block["atoms"][0]["atom"]
    image = Image.open(io.BytesIO(api.get(job["result"]["images"][1]).content))
    for atom in (top_atom, "total"):
        drawn = api.get(f"/v1/jobs/{job['id']}/attribution/1/{block['block']}/{atom}.png")
        assert drawn.status_code == 200 and drawn.headers["content-type"] == "image/png"
        assert Image.open(io.BytesIO(drawn.content)).size == image.size
    assert api.get(f"/v1/jobs/{job['id']}/attribution/1/{block['block']}/15999.png").status_code == 404
    assert api.get(f"/v1/jobs/{job['id']}/attribution/2/{block['block']}/total.png").status_code == 404
    # Another tenant's attribution is as missing as no attribution at all.
    assert other.get(f"/v1/jobs/{job['id']}/attribution").status_code == 404
    assert other.get(f"/v1/jobs/{job['id']}/attribution/0/{block['block']}/total.png").status_code == 404

    # Masking the top atom: its map goes to zero, and the adapter's effect loses most of its mass.
    mask = {"mode": "drop", "blocks": {str(block["block"]): [top_atom]}}
    _, masked = generate(atom_mask=mask)
    masked_block = next(entry for entry in masked["blocks"] if entry["block"] == block["block"])
    assert _mass(next(a["maps"] for a in masked_block["atoms"] if a["atom"] == top_atom)) == 0
    atom_mass = _mass(block["atoms"][0]["maps"])
    removed = _mass(block["total"]) - _mass(masked_block["total"])
    assert removed >= 0.8 * atom_mass, (removed, atom_mass)

    plain = api.post("/v1/generations", json={"prompt": "p", "attribution": 1})
    assert plain.status_code == 422 and "give adapter_id or adapters" in plain.json()["error"]["message"]
    too_many = api.post("/v1/generations", json={"prompt": "p", "adapter_id": adapter_id, "attribution": 9})
    assert too_many.status_code == 422
    no_maps = api.post(
        "/v1/generations", json={"prompt": "p", "steps": 1, "adapter_id": adapter_id}, params={"wait": 60}
    )
    no_maps_job = no_maps.json()["job"]
    assert no_maps_job["result"]["attribution"] is None
    assert api.get(f"/v1/jobs/{no_maps_job['id']}/attribution").status_code == 404
