"""The shuffle buffer is bounded in bytes as well as in count, and still yields every sample once."""

from __future__ import annotations

import random

import pytest

from saber_pl.shuffle import bounded_shuffle, sample_bytes


def _stream(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)  # encoded clips of very different sizes (1 kB .. 300 kB)
    return [{"__key__": f"{i:05d}", "mp4": bytes(rng.randint(1_000, 300_000)), "txt": b"a caption"} for i in range(n)]


def _held_while_yielding(samples: list[dict], **kw) -> tuple[list[dict], int, int]:
    """Run the shuffle and record the most samples and bytes it held at any yield."""
    consumed: list[dict] = []

    def source():
        for s in samples:
            consumed.append(s)
            yield s

    out, most_count, most_bytes = [], 0, 0
    for s in bounded_shuffle(source(), **kw):
        held = [x for x in consumed if all(x is not y for y in out)]  # consumed, not yet yielded (incl. s)
        most_count, most_bytes = max(most_count, len(held)), max(most_bytes, sum(map(sample_bytes, held)))
        out.append(s)
    return out, most_count, most_bytes


def test_byte_bound_holds_whatever_the_sizes() -> None:
    samples = _stream(300)
    out, most_count, most_bytes = _held_while_yielding(samples, max_count=200, max_bytes=2_000_000, seed=1)
    assert sorted(s["__key__"] for s in out) == [s["__key__"] for s in samples]  # each sample exactly once
    biggest = max(map(sample_bytes, samples))
    assert most_bytes <= 2_000_000 + biggest  # the buffer plus the sample being handed over
    assert most_count < 200  # the byte bound, not the count, is what limited it here
    # with a count bound of 200 alone (webdataset's shuffle), the same stream would have held ~30 MB
    assert sum(map(sample_bytes, samples[:200])) > 10 * 2_000_000


def test_count_bound_and_shuffling() -> None:
    samples = _stream(100)
    out, most_count, _ = _held_while_yielding(samples, max_count=10, max_bytes=10**12, seed=2)
    assert most_count <= 10 + 1
    keys = [s["__key__"] for s in out]
    assert sorted(keys) == [s["__key__"] for s in samples] and keys != sorted(keys)
    again = [s["__key__"] for s in bounded_shuffle(iter(samples), max_count=10, max_bytes=10**12, seed=2)]
    other = [s["__key__"] for s in bounded_shuffle(iter(samples), max_count=10, max_bytes=10**12, seed=3)]
    assert again == keys and other != keys  # deterministic per seed


def test_bad_bounds_are_rejected() -> None:
    with pytest.raises(ValueError, match="shuffle bounds"):
        list(bounded_shuffle(iter(_stream(3)), max_count=0, max_bytes=1, seed=0))


def test_datamodule_rejects_a_non_positive_byte_bound() -> None:
    from saber_pl.datamodule import DataConfig

    with pytest.raises(ValueError, match="shuffle_buffer_mb"):
        DataConfig(shuffle_buffer_mb=0)
