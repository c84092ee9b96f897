"""The support sets a server holds (:class:`SupportStore`), shared by all its Segmenters."""

import threading
from collections import OrderedDict
from collections.abc import MutableMapping


class SupportStore(MutableMapping):
    """A thread-safe, bounded LRU map: support id -> ``SupportSet`` (+ the shot digests of the id).

    Shared by every Segmenter of a server: a set registered through one instance is segmented by any.
    Entries are immutable once stored (a changed set has a new id), so readers need no copy.
    """

    def __init__(self, capacity: int):
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self.capacity = capacity
        self.evictions = 0
        self._items: OrderedDict = OrderedDict()
        self._shots: dict[str, list[list[str]]] = {}
        self._lock = threading.Lock()

    def put(self, key: str, support, shots: list[list[str]]) -> None:
        with self._lock:
            self._items[key] = support
            self._shots[key] = shots
            self._items.move_to_end(key)
            while len(self._items) > self.capacity:
                old, _ = self._items.popitem(last=False)
                self._shots.pop(old, None)
                self.evictions += 1

    def shots(self, key: str) -> list[list[str]]:
        with self._lock:
            return self._shots[key]

    def __getitem__(self, key):
        with self._lock:
            value = self._items[key]
            self._items.move_to_end(key)
            return value

    def __setitem__(self, key, value):
        raise TypeError("use put(id, support, shots): an id goes with its shot digests")

    def __delitem__(self, key):
        with self._lock:
            del self._items[key]
            self._shots.pop(key, None)

    def __contains__(self, key):
        with self._lock:
            return key in self._items

    def __iter__(self):
        with self._lock:
            return iter(list(self._items))

    def __len__(self):
        with self._lock:
            return len(self._items)
