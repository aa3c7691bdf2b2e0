"""The adapter cache, in tiers: resident on the device (installed in the host, LRU, N slots), in
host memory (LRU, byte budget), then storage. A job whose adapter is resident loads nothing.

Adapters in use by the running batch are pinned: eviction passes over them, and a deleted one
leaves once its last user has."""

import time
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

from adapters import AdapterHost, SparseDictionaryAdapter
from service.core.contract import CacheTier


@dataclass
class CacheStats:
    hits: Counter[str] = field(default_factory=Counter)
    misses: Counter[str] = field(default_factory=Counter)
    load_seconds: Counter[str] = field(default_factory=Counter)


class CacheFull(RuntimeError):
    """Every device slot holds an adapter the running batch uses; the request waits for one to free."""


@dataclass(frozen=True)
class CacheHit:
    tier: CacheTier
    seconds: float


class AdapterCache:
    def __init__(self, host: AdapterHost, device_slots: int, host_bytes: int) -> None:
        self.host = host
        self.device_slots = device_slots
        self.host_bytes = host_bytes
        self.stats = CacheStats()
        # Insertion order is recency: the first entry is the least recently used.
        self._resident: OrderedDict[str, None] = OrderedDict()
        self._memory: OrderedDict[str, SparseDictionaryAdapter] = OrderedDict()
        self._memory_used = 0
        self._pins: Counter[str] = Counter()
        self._doomed: set[str] = set()

    def acquire(self, adapter_id: str, load: Callable[[], SparseDictionaryAdapter]) -> CacheHit:
        """Makes the adapter resident under its id; ``load`` reads it from storage on a full miss."""
        if adapter_id in self._resident:
            self._resident.move_to_end(adapter_id)
            self.stats.hits["device"] += 1
            return CacheHit("device", 0.0)
        if len(self._resident) >= self.device_slots and not self._evictable():
            raise CacheFull(f"all {self.device_slots} device slots hold adapters in use")
        self.stats.misses["device"] += 1
        started = time.perf_counter()
        adapter = self._memory.pop(adapter_id, None)
        tier: CacheTier
        if adapter is not None:
            self._memory_used -= adapter.nbytes()
            tier = "host"
        else:
            self.stats.misses["host"] += 1
            adapter = load()
            tier = "storage"
        self.stats.hits[tier] += 1
        self.insert(adapter_id, adapter)
        seconds = time.perf_counter() - started
        self.stats.load_seconds[tier] += seconds
        return CacheHit(tier, seconds)

    def insert(self, adapter_id: str, adapter: SparseDictionaryAdapter) -> None:
        """Makes an adapter the worker already holds (e.g. just trained) resident."""
        while len(self._resident) >= self.device_slots:
            evicted = self._evictable()
            if evicted is None:
                raise CacheFull(f"all {self.device_slots} device slots hold adapters in use")
            del self._resident[evicted]
            self._remember(evicted, self.host.remove(evicted).to("cpu"))
        self.host.add(adapter_id, adapter)
        self._resident[adapter_id] = None

    def _evictable(self) -> str | None:
        """The least recently used resident adapter that no running request uses."""
        return next((name for name in self._resident if not self._pins[name]), None)

    def pin(self, adapter_id: str) -> None:
        """Marks a resident adapter in use: it is not evicted until as many ``unpin`` calls."""
        self._pins[adapter_id] += 1

    def unpin(self, adapter_id: str) -> None:
        self._pins[adapter_id] -= 1
        if self._pins[adapter_id] <= 0:
            del self._pins[adapter_id]
            if adapter_id in self._doomed:
                self._doomed.discard(adapter_id)
                self.discard(adapter_id)

    def resident(self) -> dict[CacheTier, int]:
        """How many adapters each tier holds now."""
        return {"device": len(self._resident), "host": len(self._memory)}

    def device_bytes(self) -> int:
        """Device bytes the resident adapters take, all they hold counted."""
        # Read by the metrics thread while the loop may change the tiers: a copy, and names checked.
        return sum(self.host.resident_bytes(name) for name in list(self._resident) if name in self.host)

    def names(self) -> list[str]:
        """The ids of every adapter the device and host tiers hold."""
        return [*self._resident, *self._memory]

    def discard(self, adapter_id: str) -> bool:
        """Drops the adapter from the device and host tiers (it was deleted); False if neither held it.
        One in use leaves when its last user has."""
        if self._pins[adapter_id]:
            self._doomed.add(adapter_id)
            return True
        held = adapter_id in self._resident
        if held:
            del self._resident[adapter_id]
            self.host.remove(adapter_id)
        adapter = self._memory.pop(adapter_id, None)
        if adapter is not None:
            self._memory_used -= adapter.nbytes()
        return held or adapter is not None

    def _remember(self, adapter_id: str, adapter: SparseDictionaryAdapter) -> None:
        size = adapter.nbytes()
        if size > self.host_bytes:
            return
        while self._memory_used + size > self.host_bytes:
            _, dropped = self._memory.popitem(last=False)
            self._memory_used -= dropped.nbytes()
        self._memory[adapter_id] = adapter
        self._memory_used += size
