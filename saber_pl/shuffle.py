"""A shuffle buffer bounded in bytes as well as in samples, for streams of still-encoded samples.

webdataset's `shuffle(bufsize, initial)` bounds only the count. At scale the samples are encoded source
videos of widely varying size: 200 of 30 MB per worker x 32 workers per node is 190 GB of host memory.
This buffer yields a random element whenever holding the next sample would exceed either bound, so a
worker holds at most `max_bytes` (plus one sample) whatever the clip sizes. Written by hand because no
library stage bounds a shuffle by bytes.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Iterator
from typing import Any


def sample_bytes(sample: dict[str, Any]) -> int:
    """Payload size of a raw WebDataset sample: the bytes of its members."""
    return sum(len(v) for v in sample.values() if isinstance(v, (bytes, bytearray, memoryview)))


def bounded_shuffle(src: Iterable[dict[str, Any]], max_count: int, max_bytes: int, seed: int,
                    initial: int | None = None) -> Iterator[dict[str, Any]]:
    """Shuffle `src` through a buffer of at most `max_count` samples and `max_bytes` bytes.

    Like webdataset's shuffle, nothing is yielded until the buffer holds `initial` samples (default
    `max_count`) or reaches the byte bound; at the end the rest is drained in random order.
    """
    if max_count < 1 or max_bytes < 1:
        raise ValueError(f"shuffle bounds must be >= 1, got max_count={max_count}, max_bytes={max_bytes}")
    rng = random.Random(seed)
    initial = max_count if initial is None else min(initial, max_count)
    buf: list[dict[str, Any]] = []
    sizes: list[int] = []
    held = 0
    filling = True

    def pop() -> dict[str, Any]:
        nonlocal held
        i = rng.randrange(len(buf))
        buf[i], buf[-1] = buf[-1], buf[i]
        sizes[i], sizes[-1] = sizes[-1], sizes[i]
        held -= sizes.pop()
        return buf.pop()

    for sample in src:
        size = sample_bytes(sample)
        if filling and (len(buf) >= initial or held + size > max_bytes):
            filling = False
        while not filling and buf and (len(buf) >= max_count or held + size > max_bytes):
            yield pop()
        buf.append(sample)
        sizes.append(size)
        held += size
    while buf:
        yield pop()
