"""Streams of queries: the next batch is decoded on worker threads while the current one is segmented."""

import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
from PIL import Image

from fss.errors import FssError
from fss.runtime.results import Segmentation


@dataclass
class StreamResult:
    """One query of :meth:`Segmenter.segment_stream`: its result (``labels`` and ``prob`` are the
    result's, kept for older callers), or the error."""

    query: object
    image: Image.Image | None
    labels: np.ndarray | None = None
    prob: np.ndarray | None = None
    error: Exception | None = None
    seconds: float = 0.0  # this query's share of its batch's device time
    result: Segmentation | None = None


def stream(
    queries: Iterable, batch: int, workers: int, load: Callable, segment: Callable
) -> Iterator[StreamResult]:
    """One :class:`StreamResult` per query, in input order. ``load(query)`` -> (image, tensor) runs on
    ``workers`` threads; ``segment(images, tensors)`` -> a :class:`Segmentation` per query, one batch at
    a time. A query that cannot be decoded carries its ``error`` and the stream goes on."""
    queries = iter(queries)

    def next_batch(pool):
        items = [q for _, q in zip(range(batch), queries, strict=False)]
        return items, [pool.submit(load, q) for q in items]

    with ThreadPoolExecutor(max(1, workers)) as pool:
        items, futures = next_batch(pool)
        while items:
            loaded = decoded(items, futures)
            items, futures = next_batch(pool)  # decoding overlaps the encoder below
            good = [entry for entry in loaded if entry[1] is not None]
            start = time.perf_counter()
            outputs = segment([e[1] for e in good], [e[2] for e in good]) if good else []
            share = (time.perf_counter() - start) / max(1, len(good))
            outputs = iter(outputs)
            for item, img, payload in loaded:
                if img is None:
                    yield StreamResult(item, None, error=payload)
                    continue
                result = next(outputs)
                yield StreamResult(item, img, result.labels, result.prob, seconds=share, result=result)


def decoded(items: list, futures: list) -> list[tuple]:
    """``(item, image, tensor)`` per decoded query, ``(item, None, error)`` per refused one."""
    loaded = []
    for item, future in zip(items, futures, strict=True):
        try:
            loaded.append((item, *future.result()))
        except (FssError, OSError, ValueError) as err:
            loaded.append((item, None, err))
    return loaded
