"""schemathesis against the running gateway: every operation of the OpenAPI schema, at least 25
generated requests each (from the schema, its edge cases and stateful sequences), with a tenant's
key; no response may be a 5xx or break the schema. A stack of its own (Redis, gateway, a
generation worker on the tiny base, so that ``/readyz`` is ready and generations end). The
tenant starts with an imported adapter, which the stateful phase finds through the links from
the adapter list and passes to the adapter's routes (schemathesis cannot make one: uploads must
be real images or a real adapter zip)."""

import os
import re
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from service.app import create_app
from service.core.redis_db import connect
from service.core.tenants import TenantStore
from service.core.worker_registry import base_shape
from tests.service.conftest import adapter_zip, serve_stack

SCHEMATHESIS = Path(sys.executable).parent / "schemathesis"


@pytest.fixture(scope="module")
def fuzzed_stack(own_env: Callable[..., dict[str, str]], tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    # Generated requests come fast and many, and each may wait: quota and waits out of the way.
    env = own_env("fuzz", max_active_jobs_per_tenant="100000", max_wait_seconds="1")
    yield from serve_stack(env, tmp_path_factory)


def test_operation_ids_are_unique_and_every_link_names_an_operation_and_its_parameters() -> None:
    schema = create_app().openapi()
    operations = {op["operationId"]: (path, op) for path, ops in schema["paths"].items() for op in ops.values()}
    assert len(operations) == sum(len(ops) for ops in schema["paths"].values())
    links = [
        link
        for _, op in operations.values()
        for response in op["responses"].values()
        for link in response.get("links", {}).values()
    ]
    assert len(links) >= 10
    for link in links:
        path, target = operations[link["operationId"]]
        required = {p["name"] for p in target.get("parameters", []) if p["in"] == "path"}
        assert set(link["parameters"]) == required, (link, path)


@pytest.mark.timeout(900)
def test_generated_requests_get_no_5xx_and_only_documented_responses(
    fuzzed_stack: str, own_redis_url: str, tmp_path: Path
) -> None:
    db = connect(own_redis_url)
    key = TenantStore(db).create("fuzzer")[1]
    base = base_shape(db)
    assert base is not None
    bundle = adapter_zip(tmp_path, base.fingerprint, 8, base.in_features, base.num_blocks)
    imported = httpx.post(
        f"{fuzzed_stack}/v1/adapters/import",
        files={"file": ("adapter.zip", bundle, "application/zip")},
        headers={"Authorization": f"Bearer {key}"},
        # The gateway's first import loads torch (the engine checks the adapter): seconds on a busy machine.
        timeout=120,
    )
    assert imported.status_code == 201, imported.text
    command = [
        str(SCHEMATHESIS),
        "run",
        f"{fuzzed_stack}/openapi.json",
        "--checks",
        "not_a_server_error,response_schema_conformance,status_code_conformance,content_type_conformance",
        "--max-examples",
        "25",
        "--header",
        f"Authorization: Bearer {key}",
        # One worker: hypothesis parses lambdas' source with ast, which CPython 3.11 does not
        # make thread-safe ("AST constructor recursion depth mismatch" under several workers).
        "--workers",
        "1",
        "--seed",
        "1",
        "--no-color",
    ]
    run = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "NO_COLOR": "1"}, timeout=840)
    report = run.stdout + run.stderr
    assert run.returncode == 0, report[-6000:]
    selected = re.search(r"Selected: (\d+)/(\d+)", report)
    tested = re.search(r"Tested: (\d+)", report)
    assert selected and tested, report[-3000:]
    # Every operation of the schema ran, with at least 25 requests each on average.
    assert selected[1] == selected[2] == tested[1], report[-3000:]
    generated = re.search(r"(\d+) generated", report)
    assert generated and int(generated[1]) >= 25 * int(tested[1]), report[-3000:]
    print(report[report.find("Stateful") :])  # what ran, for `pytest -s`
