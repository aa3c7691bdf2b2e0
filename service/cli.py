"""``atomtune``: serve the gateway, run a worker, manage tenants, or bring everything up at once."""

import argparse
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from types import FrameType

import redis

from service.core.queue import QUEUES
from service.core.redis_db import connect
from service.core.settings import get_settings
from service.core.tenants import TenantStore
from service.core.worker_registry import node_name


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from service.http_protocol import with_header_timeout

    settings = get_settings()
    uvicorn.run(
        "service.app:create_app",
        factory=True,
        host=args.host or settings.host,
        port=args.port or settings.port,
        log_level=args.loglevel,
        http=with_header_timeout(settings.header_timeout_seconds),
        timeout_keep_alive=settings.keep_alive_seconds,
    )
    return 0


def _worker(args: argparse.Namespace) -> int:
    settings = get_settings()
    if not settings.base_model:
        print("atomtune worker: set ATOMTUNE_BASE_MODEL to a diffusers folder or hub id", file=sys.stderr)
        return 2
    names = [q.strip() for q in args.queues.split(",") if q.strip()]
    unknown = [q for q in names if q not in QUEUES]
    if unknown or not names:
        print(f"atomtune worker: --queues takes {', '.join(QUEUES)}; got {args.queues!r}", file=sys.stderr)
        return 2
    # Unique per process, so several workers on one machine never share a name.
    node = args.hostname or f"atomtune-{uuid.uuid4().hex[:8]}"
    if len(set(names)) > 1:
        return _worker_per_queue(args, node, settings.worker_metrics_port)
    from worker.app import app

    if names[0] == "generate":
        # One process, its scheduler batching the generations that its threads take.
        pool = ["--pool", "threads", "--concurrency", str(settings.max_batch)]
    else:
        pool = ["--pool", "prefork", "--concurrency", str(args.concurrency)]
    app.worker_main(
        [
            "worker",
            "--queues",
            QUEUES[names[0]],
            *pool,
            "--loglevel",
            args.loglevel,
            "--hostname",
            node if args.hostname else node_name(node, names[0]),
        ]
    )
    return 0


def _worker_per_queue(args: argparse.Namespace, node: str, metrics_port: int) -> int:
    """Both queues: a worker per queue, so that a training never holds up generations; each holds
    its own copy of the model, and is named ``node_name(node, queue)``. Signals are passed on to
    both; when one exits, the other gets a cold shutdown (its running jobs go back to the queue)."""
    command = [sys.executable, "-m", "service.cli", "worker", "--loglevel", args.loglevel]
    names = {queue: ["--hostname", node_name(node, queue)] for queue in QUEUES}
    # The generation worker serves its metrics on the port; the fine-tuning one's pool processes after it.
    finetune_env = {**os.environ, "ATOMTUNE_WORKER_METRICS_PORT": str(metrics_port + 1 if metrics_port else 0)}
    children = [
        subprocess.Popen([*command, "--queues", "generate", *names["generate"]]),
        subprocess.Popen(
            [*command, "--queues", "finetune", "--concurrency", str(args.concurrency), *names["finetune"]],
            env=finetune_env,
        ),
    ]

    def forward(signum: int, _: FrameType | None) -> None:
        for child in children:
            if child.poll() is None:
                child.send_signal(signum)

    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT):
        signal.signal(signum, forward)
    while all(child.poll() is None for child in children):
        time.sleep(0.5)
    forward(signal.SIGQUIT, None)
    codes = [child.wait() for child in children]
    return next((code for code in codes if code), 0)


def _tenants() -> TenantStore:
    return TenantStore(connect(get_settings().redis_url))


def _tenant_create(args: argparse.Namespace) -> int:
    try:
        tenant, key = _tenants().create(args.name)
    except ValueError as exc:
        print(f"atomtune tenant create: {exc}", file=sys.stderr)
        return 1
    print(f"tenant: {tenant.id} {tenant.name}")
    print(f"key: {key}")
    print("The key is shown only this once; store it now.", file=sys.stderr)
    return 0


def _tenant_list(_: argparse.Namespace) -> int:
    for tenant in _tenants().list():
        created = datetime.fromtimestamp(tenant.created_at, UTC).isoformat(timespec="seconds")
        state = "revoked" if tenant.revoked else "active"
        print(f"{tenant.id}\t{tenant.name}\t{state}\t{created}")
    return 0


def _tenant_revoke(args: argparse.Namespace) -> int:
    if not _tenants().revoke(args.tenant_id):
        print(f"atomtune tenant revoke: no tenant '{args.tenant_id}'", file=sys.stderr)
        return 1
    print(f"revoked {args.tenant_id}")
    return 0


def _up(args: argparse.Namespace) -> int:
    from service.up import run_up

    return run_up(args.host, args.port)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="atomtune", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the HTTP gateway")
    serve.add_argument("--host", help="bind address (default ATOMTUNE_HOST)")
    serve.add_argument("--port", type=int, help="port (default ATOMTUNE_PORT)")
    serve.add_argument("--loglevel", default="info")
    serve.set_defaults(func=_serve)

    worker = commands.add_parser("worker", help="run Celery workers that hold the base model")
    worker.add_argument(
        "--queues", default=",".join(QUEUES), help="finetune, generate or both (default: a worker for each)"
    )
    worker.add_argument(
        "--concurrency",
        type=int,
        default=1,
        help="fine-tuning pool processes, each with its own copy of the model (generations: ATOMTUNE_MAX_BATCH)",
    )
    worker.add_argument(
        "--hostname",
        help="Celery node name; with both queues, each worker's is this with its queue added (default: unique)",
    )
    worker.add_argument("--loglevel", default="info")
    worker.set_defaults(func=_worker)

    tenant = commands.add_parser("tenant", help="manage tenants and their API keys")
    tenant_commands = tenant.add_subparsers(dest="tenant_command", required=True)
    create = tenant_commands.add_parser("create", help="create a tenant and print its key (once)")
    create.add_argument("name")
    create.set_defaults(func=_tenant_create)
    tenant_commands.add_parser("list", help="list tenants").set_defaults(func=_tenant_list)
    revoke = tenant_commands.add_parser("revoke", help="revoke a tenant and all its keys")
    revoke.add_argument("tenant_id")
    revoke.set_defaults(func=_tenant_revoke)

    up = commands.add_parser("up", help="Redis (if none answers), a gateway and a worker on this machine")
    up.add_argument("--host", help="bind address (default ATOMTUNE_HOST)")
    up.add_argument("--port", type=int, help="port (default ATOMTUNE_PORT)")
    up.set_defaults(func=_up)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # Everything the service writes (uploads, adapters, outputs, the Redis files `up` starts) holds
    # tenants' data: private to the service's user, as are the children it starts.
    os.umask(0o077)
    try:
        return int(args.func(args))
    except redis.ConnectionError:
        url = get_settings().redis_url
        print(f"atomtune: no Redis answers at {url}; start one, or run `atomtune up`", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
