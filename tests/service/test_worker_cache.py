"""The tiered adapter cache on a real (tiny) transformer and adapter host."""

from collections.abc import Callable

import pytest

from adapters import AdapterHost, SparseDictionaryAdapter, SparseDictionaryConfig, build_tiny_pipeline
from worker.cache import AdapterCache


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

    cache.discard("b")
    assert host.names() == []
