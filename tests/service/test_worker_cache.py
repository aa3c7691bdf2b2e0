"""The tiered adapter cache on a real (tiny) transformer and adapter host, and how deleted adapters
leave it: by the notice a delete publishes, or, for notices missed, when the worker subscribes."""

import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from adapters import AdapterHost, SparseDictionaryAdapter, SparseDictionaryConfig, build_tiny_pipeline
from service.core.ids import new_id
from service.core.redis_db import adapter_key, connect
from service.core.settings import Settings
from service.core.storage import Storage
from worker.cache import AdapterCache
from worker.context import WorkerContext
from worker.eviction import listen_for_deletions


@pytest.fixture(scope="module")
def host() -> AdapterHost:
    return AdapterHost(build_tiny_pipeline().transformer)


def test_tiers_fill_and_evict_least_recently_used(host: AdapterHost) -> None:
    def adapter() -> SparseDictionaryAdapter:
        return SparseDictionaryAdapter.create(SparseDictionaryConfig(num_atoms=8), host.transformer)

    size = adapter().nbytes()
    cache = AdapterCache(host, device_slots=1, host_bytes=size)
    loads: list[str] = []

    def loader(name: str) -> Callable[[], SparseDictionaryAdapter]:
        def load() -> SparseDictionaryAdapter:
            loads.append(name)
            return adapter()

        return load

    assert cache.acquire("a", loader("a")).tier == "storage"
    assert cache.acquire("a", loader("a")).tier == "device"
    assert cache.acquire("b", loader("b")).tier == "storage"  # a leaves the device for host memory
    assert host.names() == ["b"]
    assert cache.acquire("a", loader("a")).tier == "host"  # b goes to host memory, a's place
    assert cache.acquire("c", loader("c")).tier == "storage"  # a to host memory; budget drops b
    assert cache.acquire("b", loader("b")).tier == "storage"
    assert loads == ["a", "b", "c", "b"]
    assert cache.stats.hits == {"device": 1, "host": 1, "storage": 4}
    assert cache.stats.misses == {"device": 5, "host": 4}

    assert cache.resident() == {"device": 1, "host": 1} and sorted(cache.names()) == ["b", "c"]
    assert cache.discard("b") is True  # from the device
    assert host.names() == []
    assert cache.discard("c") is True  # from host memory
    assert cache.resident() == {"device": 0, "host": 0} and cache.names() == []
    assert cache.discard("c") is False
    assert cache.acquire("c", loader("c")).tier == "storage"


def test_a_worker_process_drops_deleted_adapters_notified_or_missed(
    settings: Settings, tmp_path: Path, wait_for: Callable[..., None]
) -> None:
    ctx = WorkerContext(settings, connect(settings.redis_url), Storage(tmp_path))
    runtime = ctx.runtime()
    tenant, kept, missed = new_id(), new_id(), new_id()
    for adapter_id in (kept, missed):
        ctx.catalog.create(adapter_id, tenant, "p", "imported", {"num_atoms": 8})
        adapter = SparseDictionaryAdapter.create(SparseDictionaryConfig(num_atoms=8), runtime.pipeline.transformer)
        runtime.cache.insert(adapter_id, adapter)
    # Deleted while this process was not listening: no notice will come.
    ctx.db.delete(adapter_key(missed))

    stop = threading.Event()
    listener = threading.Thread(target=listen_for_deletions, args=(ctx, stop), daemon=True)
    listener.start()
    try:
        wait_for(lambda: runtime.cache.names() == [kept], 10, "the missed deletion to be caught up on")
        ctx.catalog.delete(kept, tenant)
        wait_for(lambda: runtime.cache.names() == [], 10, "the notified deletion")
        assert runtime.host.names() == []
    finally:
        stop.set()
        listener.join(10)
    assert not listener.is_alive()
