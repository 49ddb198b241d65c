"""datamodule.py: batches, determinism, rank x worker splitting, bad-input skipping, K, augmentation on transfer."""

from __future__ import annotations

import dataclasses
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from saber_pl.augment import AugmentConfig
from saber_pl.datamodule import SKIP_REASONS, DataConfig, SaberDataModule, expand_shards, fit_pad
from saber_pl.masks import MaskConfig
from saber_pl.shards import write_samples
from saber_pl.video import encode_mp4

ROOT = Path(__file__).resolve().parent.parent
TINY = str(ROOT / "data" / "test" / "tiny-000000.tar")
F, FPS, SIZE = 5, 8.0, 32  # clips of 5 frames at 8 fps from 16 fps sources: a span of 9 source frames


def tokenize(captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Bytes as ids, padded to the longest caption (at least 1)."""
    n = max(1, max(len(c.encode()) for c in captions))
    ids = torch.zeros(len(captions), n, dtype=torch.long)
    mask = torch.zeros(len(captions), n, dtype=torch.long)
    for i, c in enumerate(captions):
        b = list(c.encode())
        ids[i, : len(b)], mask[i, : len(b)] = torch.tensor(b, dtype=torch.long), 1
    return ids, mask


def video(seed: int, frames: int = 12) -> bytes:
    return encode_mp4(np.random.default_rng(seed).integers(0, 255, (frames, SIZE, SIZE, 3), dtype=np.uint8), 16)


def good(key: str, seed: int) -> dict:
    return {"__key__": key, "mp4": video(seed), "txt": f"clip {key}".encode(), "json": b"{}"}


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    d = tmp_path_factory.mktemp("shards")
    write_samples((good(f"g{i:02d}", i) for i in range(16)), str(d / "good-%06d.tar"), maxcount=4)
    lost = encode_mp4(np.random.default_rng(99).integers(0, 255, (24, SIZE, SIZE, 3), dtype=np.uint8), 16,
                      faststart=True)
    ok = video(50)
    bad = [
        {"__key__": "truncated", "mp4": ok[: len(ok) // 2], "txt": b"cut", "json": b"{}"},  # index lost
        {"__key__": "garbage", "mp4": b"\x13garbage" * 40, "txt": b"junk", "json": b"{}"},
        {"__key__": "nocaption", "mp4": ok, "json": b"{}"},
        {"__key__": "novideo", "txt": b"no video here", "json": b"{}"},
        {"__key__": "short", "mp4": video(51, frames=4), "txt": b"too short", "json": b"{}"},
        {"__key__": "lostframes", "mp4": lost[: len(lost) // 5], "txt": b"frames lost", "json": b"{}"},
        {"__key__": "emptycap", "mp4": video(52), "txt": b"  ", "json": b"{}"},  # kept, counted
        good("tail0", 53), good("tail1", 54),  # one good sample last per reader: its batch ships the counts
    ]
    write_samples(bad, str(d / "bad-%06d.tar"), maxcount=100)
    write_samples((good(f"t{i}", 60 + i) for i in range(3)), str(d / "broken-%06d.tar"), maxcount=100)
    broken = d / "broken-000000.tar"
    data = broken.read_bytes()
    broken.write_bytes(data[: data.index(b"clip t1") - 2000])  # cut inside the second sample's members
    return {"good": str(d / "good-{000000..000003}.tar"), "bad": str(d / "bad-000000.tar"), "broken": str(broken)}


def config(shards: str, **kw) -> DataConfig:
    base = dict(train_shards=shards, val_shards=shards, num_frames=F, fps=FPS, height=SIZE, width=SIZE,
                batch_size=2, num_workers=0, shuffle_buffer=8, seed=0)
    return DataConfig(**{**base, **kw})


def batches(loader, n: int | None = None) -> list[dict]:
    out = []
    for b in loader:
        out.append(b)
        if n is not None and len(out) == n:
            break
    return out


def test_config_validation_names_the_field() -> None:
    with pytest.raises(ValueError, match="data.refs_min"):
        DataConfig(refs_min=3, refs_max=2)
    with pytest.raises(ValueError, match="data.caption_dropout"):
        DataConfig(caption_dropout=1.5)
    with pytest.raises(ValueError, match="data.num_frames"):
        DataConfig(num_frames=0)
    assert expand_shards("a-{0..1}.tar::b-{x,y}.tar,c.tar") == ["a-0.tar", "a-1.tar", "b-x.tar", "b-y.tar", "c.tar"]


def test_batch_shapes_and_dtypes(shards) -> None:
    dm = SaberDataModule(config(shards["good"], num_workers=2), MaskConfig(), AugmentConfig(), tokenize)
    b = batches(dm.train_dataloader(), 1)[0]
    bsz, k = 2, b["ref_frames"].shape[1]
    assert b["video"].shape == (bsz, F, 3, SIZE, SIZE) and b["video"].dtype == torch.uint8
    assert b["ref_frames"].shape == (bsz, k, 3, SIZE, SIZE) and b["ref_frames"].dtype == torch.uint8
    assert b["ref_masks"].shape == (bsz, k, 1, SIZE, SIZE) and b["ref_masks"].dtype == torch.bool
    assert b["ref_counts"].dtype == torch.long and int(b["ref_counts"].max()) == k and 1 <= k <= 3
    assert b["input_ids"].dtype == torch.long and b["input_ids"].shape == b["attention_mask"].shape
    assert b["attention_mask"].sum(1).tolist() == [len(c) for c in b["caption"]]
    assert all(c.startswith("clip g") for c in b["caption"]) and len(b["key"]) == bsz
    assert list(b["skips"]) and all(v["seen"] >= 2 for v in b["skips"].values())
    # every reference is one of the clip's frames
    for i in range(bsz):
        for j in range(int(b["ref_counts"][i])):
            assert any(torch.equal(b["ref_frames"][i, j], fr) for fr in b["video"][i])


def test_deterministic_by_seed(shards) -> None:
    def first(seed: int) -> list[dict]:
        dm = SaberDataModule(config(shards["good"], num_workers=2, seed=seed))
        return batches(dm.train_dataloader(), 3)

    a, b, c = first(1), first(1), first(2)
    for x, y in zip(a, b):
        assert x["key"] == y["key"] and torch.equal(x["video"], y["video"])
        assert torch.equal(x["ref_masks"], y["ref_masks"]) and torch.equal(x["ref_counts"], y["ref_counts"])
    assert [x["key"] for x in a] != [x["key"] for x in c] or not all(
        torch.equal(x["ref_masks"], y["ref_masks"]) for x, y in zip(a, c))


@pytest.mark.parametrize("which, split", [("good", "shard"), ("bad", "sample")])
def test_two_ranks_two_workers_read_every_sample_once(shards, which: str, split: str) -> None:
    keys: list[str] = []
    for rank in range(2):
        cfg = config(shards[which], num_workers=2, resampled=False, batch_size=1, split=split,
                     max_skip_fraction=1.0)
        dm = SaberDataModule(cfg, rank=rank, world_size=2)
        keys += [k for b in dm.train_dataloader() for k in b["key"]]
    expected = {f"g{i:02d}" for i in range(16)} if which == "good" else {"emptycap", "tail0", "tail1"}
    assert sorted(keys) == sorted(expected)  # union = all, no sample twice


def test_epoch_batches_keeps_ranks_in_step() -> None:
    # 6 samples dealt to 2 ranks x 2 workers: 4 vs 2 per pass (DDP would hang); epoch_batches evens them out
    per_rank = []
    for rank in range(2):
        cfg = config(TINY, num_workers=2, resampled=False, batch_size=1, epoch_batches=3)
        keys = [k for b in SaberDataModule(cfg, rank=rank, world_size=2).train_dataloader() for k in b["key"]]
        assert len(keys) == 3
        per_rank.append(set(keys))
    assert per_rank[0].isdisjoint(per_rank[1])  # wrapping around repeats a rank's own samples only


def test_resampled_stream_differs_per_rank_and_repeats_per_seed(shards) -> None:
    def keys(rank: int) -> list[str]:
        dm = SaberDataModule(config(shards["good"], num_workers=2, shuffle_buffer=0), rank=rank, world_size=2)
        return [k for b in batches(dm.train_dataloader(), 6) for k in b["key"]]

    r0 = keys(0)
    assert r0 == keys(0) and r0 != keys(1)


def test_bad_inputs_are_skipped_and_counted(shards) -> None:
    dm = SaberDataModule(config(shards["bad"], num_workers=2, val_batch_size=1, max_skip_fraction=1.0))
    seen = [dm.on_after_batch_transfer(b, 0) for b in dm.val_dataloader()]
    assert sorted(k for b in seen for k in b["key"]) == ["emptycap", "tail0", "tail1"]
    counts = dm.skip_counts()
    assert counts == {"broken_tar": 0, "missing_video": 1, "missing_caption": 1, "corrupt_video": 2,
                      "undecodable_frame": 1, "too_short": 1, "bad_reference": 0, "missing_text": 0,
                      "missing_latent": 0, "empty_caption": 1}
    assert set(SKIP_REASONS) < set(counts) and dm.samples_seen() == 9


def test_broken_tar_is_counted_and_the_rest_is_read(shards) -> None:
    dm = SaberDataModule(config(shards["broken"] + "::" + shards["good"], val_batch_size=1, max_skip_fraction=1.0))
    keys = [k for b in dm.val_dataloader() for k in dm.on_after_batch_transfer(b, 0)["key"]]
    assert "t0" in keys and "t2" not in keys and len([k for k in keys if k.startswith("g")]) == 16
    assert dm.skip_counts()["broken_tar"] >= 1


def test_too_many_failures_raise_naming_the_shard(shards) -> None:
    dm = SaberDataModule(config(shards["bad"], max_skip_fraction=0.3, min_samples_before_raise=4))
    with pytest.raises(RuntimeError, match=r"max_skip_fraction.*bad-000000\.tar"):
        batches(dm.train_dataloader(), 2)


def test_reference_count_varies_within_range_and_refs_max_zero(shards) -> None:
    dm = SaberDataModule(config(shards["good"], batch_size=4, refs_min=1, refs_max=3))
    got = batches(dm.train_dataloader(), 8)
    counts = torch.cat([b["ref_counts"] for b in got])
    assert set(counts.tolist()) == {1, 2, 3}
    for b in got:  # padded slots are zero
        pad = torch.arange(b["ref_frames"].shape[1])[None, :] >= b["ref_counts"][:, None]
        assert not b["ref_frames"][pad].any() and not b["ref_masks"][pad].any()
        assert all(b["ref_masks"][i, j].any() for i in range(4) for j in range(int(b["ref_counts"][i])))
    dm0 = SaberDataModule(config(shards["good"], refs_min=0, refs_max=0))
    b = dm0.on_after_batch_transfer(batches(dm0.train_dataloader(), 1)[0], 0)
    assert b["refs"].shape == (2, 0, 3, SIZE, SIZE) and b["ref_masks"].shape == (2, 0, 1, SIZE, SIZE)
    assert b["ref_counts"].tolist() == [0, 0]


def test_after_transfer_layout_range_and_augmentation(shards) -> None:
    cfg = config(shards["good"], batch_size=4, refs_min=2, refs_max=3)
    raw = batches(SaberDataModule(cfg).train_dataloader(), 1)[0]
    clone = lambda b: {k: v.clone() if torch.is_tensor(v) else v for k, v in b.items()}  # noqa: E731
    out = SaberDataModule(cfg, aug_cfg=AugmentConfig()).on_after_batch_transfer(clone(raw), 0)
    again = SaberDataModule(cfg, aug_cfg=AugmentConfig()).on_after_batch_transfer(clone(raw), 0)
    assert "skips" not in out and "ref_frames" not in out
    assert out["video"].shape == (4, 3, F, SIZE, SIZE) and out["video"].dtype == torch.float32
    assert torch.allclose(out["video"], raw["video"].permute(0, 2, 1, 3, 4).float() / 127.5 - 1)
    refs, masks, counts = out["refs"], out["ref_masks"], out["ref_counts"]
    assert refs.shape == raw["ref_frames"].shape and masks.dtype == torch.float32
    assert set(masks.unique().tolist()) <= {0.0, 1.0} and refs.abs().max() <= 1.0
    assert torch.all(refs[masks.expand_as(refs) == 0] == 0)  # gray outside the (warped) mask
    pad = torch.arange(refs.shape[1])[None, :] >= counts[:, None]
    assert not refs[pad].any() and not masks[pad].any()
    assert torch.equal(refs, again["refs"]) and torch.equal(masks, again["ref_masks"])  # seeded
    valid = ~pad
    assert not torch.equal(masks[valid].bool(), raw["ref_masks"][valid])  # warped
    plain = SaberDataModule(cfg, aug_cfg=AugmentConfig(enabled=False)).on_after_batch_transfer(clone(raw), 0)
    frames = raw["ref_frames"].float() / 127.5 - 1
    assert torch.equal(plain["ref_masks"].bool(), raw["ref_masks"])
    assert torch.allclose(plain["refs"], torch.where(raw["ref_masks"], frames, torch.zeros_like(frames)))


def test_caption_dropout_empties_captions(shards) -> None:
    dm = SaberDataModule(config(shards["good"], caption_dropout=1.0), tokenize=tokenize)
    b = batches(dm.train_dataloader(), 1)[0]
    assert b["caption"] == ["", ""] and b["attention_mask"].sum() == 0
    dm.on_after_batch_transfer(b, 0)
    assert dm.skip_counts()["empty_caption"] == 0  # dropout is not an empty source caption


def test_triplets_source_reads_stored_references() -> None:
    cfg = config(TINY, source="triplets", num_frames=5, batch_size=6, refs_max=3)
    b = batches(SaberDataModule(cfg).val_dataloader(), 1)[0]
    import webdataset as wds

    raw = {s["__key__"]: s for s in wds.WebDataset(TINY, shardshuffle=False)}
    for i, key in enumerate(b["key"]):
        s = raw[key]
        n = len(json.loads(s["json"])["subjects"])
        assert int(b["ref_counts"][i]) == n
        image = np.array(fit_pad(Image.open(io.BytesIO(s["ref0.png"])).convert("RGB"), SIZE, SIZE, 128))
        assert torch.equal(b["ref_frames"][i, 0], torch.from_numpy(image).permute(2, 0, 1))
        mask = fit_pad(Image.open(io.BytesIO(s["ref0.mask.png"])).convert("L"), SIZE, SIZE, 0) >= 128
        assert torch.equal(b["ref_masks"][i, 0, 0], torch.from_numpy(mask))
    capped = batches(SaberDataModule(dataclasses.replace(cfg, refs_max=1)).val_dataloader(), 1)[0]
    assert capped["ref_counts"].tolist() == [1] * 6


def test_tiny_shard_through_video_text_source() -> None:
    cfg = config(TINY, batch_size=3, num_workers=0)
    dm = SaberDataModule(cfg, tokenize=tokenize)
    out = dm.on_after_batch_transfer(batches(dm.train_dataloader(), 1)[0], 0)
    assert out["video"].shape == (3, 3, F, SIZE, SIZE) and out["input_ids"].shape[0] == 3
    assert sum(dm.skip_counts().values()) == 0
