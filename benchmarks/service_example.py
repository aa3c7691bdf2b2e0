"""The shipped example through the service, as the README does it: fine-tune on
`examples/striped-heart/` with the API's default training fields, then generate with its prompt.

    atomtune up                                        # in one terminal; it prints a key
    python -m benchmarks.service_example --key atk_... # in another

The judge (`benchmarks/judge.py`) scores four images with the adapter and four without it (the
base model); the result says whether the tenant's fine-tune visibly yields the concept.
`tests/service/test_service_example.py` runs the same function against a stack of its own.
"""

from __future__ import annotations

import argparse
import io
import json
import time
from pathlib import Path

import httpx
from PIL import Image

from benchmarks import judge as judge_module
from benchmarks.concept_eval import concept_probability, labelled_grid

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "striped-heart"
IMAGES_PER_CHECK = 4


def fine_tune(api: httpx.Client, example: Path = EXAMPLE, **fields: object) -> dict[str, object]:
    """Uploads the example's images with their captions and the API's defaults (``fields`` over
    them), waits for the training and returns the adapter."""
    captions = (example / "captions.txt").read_text().splitlines()
    images = sorted(example.glob("*.png"), key=lambda path: int(path.stem))
    files = [("images", (path.name, path.read_bytes(), "image/png")) for path in images]
    data = {"prompt": (example / "prompt.txt").read_text().strip(), "captions": captions, **fields}
    response = api.post("/v1/adapters", data=data, files=files)
    response.raise_for_status()
    created = response.json()
    job = wait(api, created["job_id"], timeout=1800)
    if job["status"] != "succeeded":
        raise RuntimeError(f"the fine-tune ended {job['status']}: {job.get('error')}")
    return api.get(f"/v1/adapters/{created['adapter_id']}").json()


def wait(api: httpx.Client, job_id: str, timeout: float) -> dict[str, object]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = api.get(f"/v1/jobs/{job_id}").json()
        if job["status"] in ("succeeded", "failed", "cancelled"):
            return job
        time.sleep(0.5)
    raise TimeoutError(f"job {job_id} still running after {timeout:.0f} s")


def generate(api: httpx.Client, prompt: str, seed: int, adapter_id: str | None) -> list[Image.Image]:
    body: dict[str, object] = {"prompt": prompt, "num_images": IMAGES_PER_CHECK, "seed": seed}
    if adapter_id is not None:
        body["adapter_id"] = adapter_id
    response = api.post("/v1/generations", json=body)
    response.raise_for_status()
    job = wait(api, response.json()["job_id"], timeout=600)
    if job["status"] != "succeeded":
        raise RuntimeError(f"the generation ended {job['status']}: {job.get('error')}")
    return [Image.open(io.BytesIO(api.get(url).content)).convert("RGB") for url in job["result"]["images"]]  # type: ignore[index]


def check(api: httpx.Client, generation_seed: int = 0, example: Path = EXAMPLE, **fields: object) -> dict[str, object]:
    """Fine-tunes on the example (``fields`` over the API's defaults), then scores its prompt with
    and without the adapter."""
    started = time.perf_counter()
    adapter = fine_tune(api, example, **fields)
    seconds = time.perf_counter() - started
    prompt = (example / "prompt.txt").read_text().strip()
    judge = judge_module.load_judge()
    tuned = generate(api, prompt, generation_seed, str(adapter["id"]))
    base = generate(api, prompt, generation_seed, None)
    return {
        "prompt": prompt,
        "adapter_id": adapter["id"],
        "training": adapter["training"],
        "fine_tune_seconds": seconds,
        "concept_probability_with_adapter": concept_probability(judge_module.judge_images(judge, tuned)),
        "concept_probability_base": concept_probability(judge_module.judge_images(judge, base)),
        "images": {"adapter": tuned, "base": base},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--key", required=True, help="the key `atomtune up` printed")
    parser.add_argument("--seeds", type=int, default=3, help="fine-tunes, each with its own seed")
    parser.add_argument("--output", type=Path, help="write the JSON and the image grid here")
    args = parser.parse_args()
    results = []
    rows: dict[str, list[Image.Image]] = {}
    with httpx.Client(base_url=args.url, headers={"Authorization": f"Bearer {args.key}"}, timeout=60) as api:
        for seed in range(args.seeds):
            # Only the training seed is set, so that each fine-tune is reproducible; every other
            # field is the API's default, as in the README.
            result = check(api, generation_seed=seed, seed=seed)
            images: dict[str, list[Image.Image]] = result.pop("images")  # type: ignore[assignment]
            rows[f"seed {seed}, adapter"] = images["adapter"]
            rows[f"seed {seed}, base model"] = images["base"]
            results.append(result)
            print(json.dumps(result), flush=True)
    if args.output is not None:
        args.output.mkdir(parents=True, exist_ok=True)
        labelled_grid(rows, IMAGES_PER_CHECK, scale=2).save(args.output / "service_example.png")
        (args.output / "service_example.json").write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
