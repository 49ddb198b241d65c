"""shards.py (packing, reports, plain-WebDataset readability) and synthetic.py (determinism, captions)."""

from __future__ import annotations

import dataclasses
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import av
import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from saber_pl.shards import main as pack_main
from saber_pl.shards import manifest_items, pack, sidecar_items
from saber_pl.synthetic import (
    BACKGROUND_WORDS,
    BACKGROUNDS,
    MOTIONS,
    NOUNS,
    SyntheticConfig,
    build_embedded,
    clip_record,
    luma,
    make_caption,
    make_sample,
    render_clip,
    render_subject,
    sample_clip_spec,
    subject_from_record,
)
from saber_pl.video import decode_clip, encode_mp4, probe

ROOT = Path(__file__).resolve().parent.parent
COLOUR_WORDS = {"red", "green", "blue", "yellow", "orange", "purple", "pink", "brown", "black", "white", "gray",
                "grey", "cyan", "magenta", "violet", "teal", "gold", "silver", "colored", "coloured", "colorful"}
TEXTURE_WORDS = {"solid", "dots", "dotted", "spotted", "stripes", "checker", "polka"}


def clip(frames: int = 12, size: int = 32, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 255, (frames, size, size, 3), dtype=np.uint8)


def write_mkv(path: Path, frames: np.ndarray, fps: int = 12) -> None:
    """An mpeg4-in-Matroska file: a second container and codec for the packer."""
    with av.open(str(path), mode="w", format="matroska") as c:
        s = c.add_stream("mpeg4", rate=fps)
        s.width, s.height, s.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        for f in frames:
            for p in s.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)


@pytest.fixture()
def video_dir(tmp_path: Path) -> Path:
    d = tmp_path / "videos"
    (d / "sub.dir").mkdir(parents=True)
    for i in range(3):
        (d / f"clip{i}.mp4").write_bytes(encode_mp4(clip(seed=i), 12))
        (d / f"clip{i}.txt").write_text(f"caption {i}\n")
    write_mkv(d / "sub.dir" / "other.v1.mkv", clip(seed=9))
    (d / "sub.dir" / "other.v1.txt").write_text("an mkv clip")
    (d / "broken.mp4").write_bytes(b"not a video at all" * 50)
    (d / "broken.txt").write_text("never packed")
    (d / "nocaption.mp4").write_bytes(encode_mp4(clip(seed=5), 12))
    return d


def read_all(pattern: str) -> list[dict]:
    """Every sample through a plain WebDataset reader."""
    return list(wds.WebDataset(pattern, shardshuffle=False, empty_check=False))


def test_pack_folder_reports_unreadable_and_writes_readable_shards(video_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "shards"
    report = pack(sidecar_items(video_dir), out, root=video_dir, maxcount=2, workers=2, progress=False)
    assert (report["total"], report["written"], report["skipped"]) == (6, 4, 2)
    assert report["skipped_by_reason"] == {"corrupt_video": 1, "missing_caption": 1}
    assert {Path(s["path"]).name for s in report["skipped_items"]} == {"broken.mp4", "nocaption.mp4"}
    assert json.loads((out / "report.json").read_text()) == report
    assert report["shards"] == ["shard-000000.tar", "shard-000001.tar"]  # maxcount 2
    samples = read_all(str(out / "shard-{000000..000001}.tar"))
    by_key = {s["__key__"]: s for s in samples}
    assert set(by_key) == {"clip0", "clip1", "clip2", "sub_dir_other_v1"}  # no dots in keys
    mkv = by_key["sub_dir_other_v1"]
    assert "mkv" in mkv and mkv["txt"] == b"an mkv clip"
    meta = json.loads(by_key["clip1"]["json"])
    assert meta == {"fps": 12.0, "frames": 12, "width": 32, "height": 32, "codec": "h264", "source": "clip1.mp4"}
    assert by_key["clip1"]["mp4"] == (video_dir / "clip1.mp4").read_bytes()  # stored untouched
    assert decode_clip(mkv["mkv"], 6, 12, 32, 32, start=0).shape == (6, 3, 32, 32)


def test_pack_from_csv_and_maxsize(video_dir: Path, tmp_path: Path) -> None:
    csv_path = tmp_path / "list.csv"
    csv_path.write_text('path,caption\nclip0.mp4,"first, with a comma"\nclip2.mp4,second\nmissing.mp4,gone\n')
    out = tmp_path / "csv"
    report = pack(manifest_items(csv_path, video_dir), out, maxsize=1, workers=1, progress=False)
    assert report["written"] == 2 and report["skipped_by_reason"] == {"corrupt_video": 1}
    assert len(report["shards"]) == 2  # maxsize 1 byte: one sample per shard
    assert sorted(s["txt"].decode() for s in read_all(str(out / "shard-{000000..000001}.tar"))) == [
        "first, with a comma", "second"]


def test_pack_triplets_from_jsonl_via_cli(video_dir: Path, tmp_path: Path) -> None:
    Image.fromarray(clip(1, 40)[0]).save(tmp_path / "ref_a.jpg")
    Image.fromarray(np.full((40, 40), 255, np.uint8)).save(tmp_path / "mask_a.png")
    Image.fromarray(clip(1, 24)[0]).save(tmp_path / "ref_b.png")
    Image.fromarray(np.eye(24, dtype=np.uint8) * 255).save(tmp_path / "mask_b.png")
    (tmp_path / "bad.png").write_bytes(b"nope")
    rows = [
        {"path": str(video_dir / "clip0.mp4"), "caption": "two refs", "refs": ["ref_a.jpg", "ref_b.png"],
         "masks": ["mask_a.png", "mask_b.png"]},
        {"path": str(video_dir / "clip1.mp4"), "caption": "bad ref", "refs": ["bad.png"], "masks": ["mask_a.png"]},
        {"path": str(video_dir / "clip2.mp4"), "caption": "mask count", "refs": ["ref_a.jpg"], "masks": []},
    ]
    (tmp_path / "triplets.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    out = tmp_path / "trip"
    assert pack_main(["--captions", str(tmp_path / "triplets.jsonl"), "--out", str(out), "--prefix", "t",
                      "--workers", "1", "--no-progress"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["written"] == 2 and report["skipped_by_reason"] == {"bad_reference": 1}
    samples = {s["__key__"]: s for s in read_all(str(out / "t-000000.tar"))}
    two = samples["videos_clip0"]  # keys are paths relative to the list's folder
    assert {"mp4", "txt", "json", "ref0.png", "ref0.mask.png", "ref1.png", "ref1.mask.png"} <= set(two)
    assert Image.open(__import__("io").BytesIO(two["ref1.mask.png"])).mode == "L"
    assert "ref0.png" in samples["videos_clip2"] and "ref0.mask.png" not in samples["videos_clip2"]


def test_cli_module_entry_point(video_dir: Path, tmp_path: Path) -> None:
    res = subprocess.run([sys.executable, "-m", "saber_pl.shards", str(video_dir), "--out", str(tmp_path / "o"),
                          "--workers", "1", "--no-progress"], capture_output=True, text=True, cwd=ROOT, check=True)
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    assert summary["written"] == 4 and "broken.mp4" in res.stderr


# --- synthetic data set --------------------------------------------------------------------------

SMALL = SyntheticConfig(num_frames=9, fps=8.0, height=32, width=32)


def test_synthetic_clips_are_deterministic_by_seed() -> None:
    a, b, c = sample_clip_spec(7, SMALL), sample_clip_spec(7, SMALL), sample_clip_spec(8, SMALL)
    assert a == b and a != c
    fa = render_clip(a)
    assert fa.shape == (9, 32, 32, 3) and fa.dtype == np.uint8
    assert np.array_equal(fa, render_clip(b)) and not np.array_equal(fa, render_clip(c))
    assert fa.std(axis=0).mean() > 1.0  # something moves
    s1, s2 = make_sample((0, "train", 3, SMALL)), make_sample((0, "train", 3, SMALL))
    assert s1 == s2 and probe(s1["mp4"]).frames == 9


def test_subject_radius_knob_sizes_subjects_and_is_checked() -> None:
    big = SyntheticConfig(num_frames=9, fps=8.0, height=32, width=32, subject_radius=(0.3, 0.3), max_subjects=1)
    spec = sample_clip_spec(3, big)
    assert [s.radius for s in spec.subjects] == [0.3]
    wide = dataclasses.replace(big, subject_radius=(0.25, 0.4))
    radii = [sample_clip_spec(seed, wide).subjects[0].radius for seed in range(50)]
    assert 0.25 <= min(radii) < 0.3 < 0.35 < max(radii) <= 0.4
    with pytest.raises(ValueError, match="subject_radius"):
        SyntheticConfig(subject_radius=(0.3, 0.2))


@pytest.mark.parametrize("cfg", [SMALL, dataclasses.replace(SMALL, motions=MOTIONS, backgrounds=BACKGROUNDS,
                                                              max_subjects=2)], ids=["embedded", "all-kinds"])
def test_captions_name_motion_and_background_never_colours_or_textures(cfg: SyntheticConfig) -> None:
    vocab: set[str] = set()
    kinds: set[str] = set()
    backgrounds: set[str] = set()
    for seed in range(150):
        spec = sample_clip_spec(seed, cfg)
        backgrounds.add(spec.background.kind)
        words = set(re.findall(r"[a-z]+", spec.caption))
        vocab |= words
        kinds |= {m.kind for m in spec.motions}
        assert not words & COLOUR_WORDS, spec.caption
        assert BACKGROUND_WORDS[spec.background.kind] in spec.caption
        # identity lives only in the references: recolouring / retexturing a subject leaves the caption unchanged
        for s in spec.subjects:
            s.color, s.color2, s.texture, s.shape = (1, 2, 3), (4, 5, 6), "dots", "star"
        assert make_caption(spec.noun, spec.motions, spec.background) == spec.caption
    subject_words = vocab - {w for p in BACKGROUND_WORDS.values() for w in p.split()}
    assert not subject_words & TEXTURE_WORDS
    assert kinds == set(cfg.motions) and backgrounds == set(cfg.backgrounds)  # every kind drawn, no other
    assert {n.split()[1] for n in NOUNS} <= vocab


def test_content_knobs_are_checked_and_keep_backgrounds_visible() -> None:
    for bad in (dict(motions=("slide_left", "teleport")), dict(backgrounds=()), dict(background_freq=(2.0, 1.0)),
                dict(texture_freq=(0.0, 1.0)), dict(background_contrast=0.6), dict(path_jitter=0.3),
                dict(background_angles=()), dict(slide_distance=(0.5, 0.3))):
        with pytest.raises(ValueError, match=next(iter(bad))):
            SyntheticConfig(**bad)
    # the two background colours differ in value by >= background_contrast, so stripes/checks stay visible
    for seed in range(100):
        bg = sample_clip_spec(seed, SMALL).background
        v1, v2 = (max(c) / 255 for c in (bg.color, bg.color2))
        assert abs(v1 - v2) >= SMALL.background_contrast - 0.01, bg
    # slides pass near the frame's centre (the prompt says where the subject is), stripes are axis-aligned
    for seed in range(100):
        spec = sample_clip_spec(seed, SMALL)
        m = spec.motions[0]
        centre = [(a + b) / 2 for a, b in zip(m.start, m.end)]
        assert all(abs(c - 0.5) <= SMALL.path_jitter + 1e-3 for c in centre), m
        length = math.hypot(m.end[0] - m.start[0], m.end[1] - m.start[1])
        assert SMALL.slide_distance[0] - 1e-3 <= length <= SMALL.slide_distance[1] + 1e-3, m
        assert spec.background.angle in SMALL.background_angles
    anywhere = dataclasses.replace(SMALL, path_jitter=0.2, background_angles=None)
    centres = [sample_clip_spec(seed, anywhere).motions[0].start[1] for seed in range(100)]
    assert max(centres) - min(centres) > 0.2


def test_dark_first_background_order_gives_each_background_kind_its_own_mean_clip() -> None:
    """With random colour order every kind's mean clip is the same flat field, so the background word explains
    ~1 % of a clip; dark_first (same draws, the darker colour first) makes it explain about as much as the
    direction word, whose share stays."""
    from saber_pl.eval.caption_probe import explained_share

    dark = dataclasses.replace(SMALL, background_order="dark_first")
    shares = {}
    for name, cfg in (("random", SMALL), ("dark_first", dark)):
        specs = [sample_clip_spec(seed, cfg) for seed in range(240)]
        clips = torch.from_numpy(np.stack([render_clip(s) for s in specs]).astype(np.float32) / 255.0)
        shares[name] = (explained_share(clips, [s.background.kind for s in specs]),
                        explained_share(clips, [s.motions[0].kind for s in specs]))
    assert shares["random"][0] < 0.03 and shares["dark_first"][0] > 0.08, shares
    assert abs(shares["dark_first"][1] - shares["random"][1]) < 0.03, shares
    for seed in range(50):
        a, b = sample_clip_spec(seed, SMALL), sample_clip_spec(seed, dark)
        assert (a.background.kind, a.background.freq, a.background.angle, a.caption) == \
            (b.background.kind, b.background.freq, b.background.angle, b.caption)
        assert max(b.background.color) <= max(b.background.color2)  # HSV value: the darker colour first
    with pytest.raises(ValueError, match="background_order"):
        SyntheticConfig(background_order="light_first")


def _direction_explains(cfg: SyntheticConfig, n: int = 640) -> float:
    """Held-out share of the clips' luma variance (8x8 pooled) that the caption's direction explains beyond its
    background kind: group means from one half of the clips, residuals on the other."""
    x, keys = [], []
    for seed in range(n):
        spec = sample_clip_spec(50_000 + seed, cfg)
        frames = render_clip(spec).astype(np.float32).mean(-1) / 255.0  # [F, H, W] luma
        f, h, w = frames.shape
        x.append(frames.reshape(f, 8, h // 8, 8, w // 8).mean((2, 4)).ravel())
        keys.append((spec.background.kind, spec.motions[0].kind))
    x = np.stack(x)
    fit, held = np.arange(n) % 2 == 0, np.arange(n) % 2 == 1
    res_bg = res_both = 0.0
    for bg, motion in set(keys):
        same_bg = np.array([k[0] == bg for k in keys])
        both = np.array([k == (bg, motion) for k in keys])
        held_x = x[both & held]
        res_bg += ((held_x - x[same_bg & fit].mean(0)) ** 2).sum()
        res_both += ((held_x - x[both & fit].mean(0)) ** 2).sum()
    return float((res_bg - res_both) / res_bg)


def test_subjects_outshine_the_background_so_the_direction_word_shapes_the_mean_clip() -> None:
    # Issue 12: with subject and background brightness independent, the mean clip of "slides left" and of
    # "slides right" were the same picture, so at high noise the direction word told the denoiser nothing.
    for seed in range(100):
        spec = sample_clip_spec(seed, SMALL)
        bg = max(luma(spec.background.color), luma(spec.background.color2))
        for s in spec.subjects:
            assert min(luma(s.color), luma(s.color2)) >= bg + SMALL.subject_contrast - 0.01, (s, spec.background)
            # paled, never neutral: a gray subject colour would read as a reference's gray fill (gray halo)
            assert all((max(c) - min(c)) / max(c) >= 0.29 for c in (s.color, s.color2)), s
    old = dataclasses.replace(SMALL, background_value=(0.2, 0.9), subject_contrast=None, background_contrast=0.3)
    assert _direction_explains(old) < 0.02  # the known-bad data set: nothing beyond chance
    assert _direction_explains(SMALL) > 0.08
    for bad in (dict(background_value=(0.6, 0.2)), dict(subject_contrast=0.7)):
        with pytest.raises(ValueError, match=next(iter(bad))):
            SyntheticConfig(**bad)


def test_record_keeps_subjects_and_trajectories_and_product_photo() -> None:
    spec = sample_clip_spec(3, SMALL)
    rec = json.loads(json.dumps(clip_record(spec)))
    assert (rec["frames"], rec["fps"], rec["width"], rec["height"]) == (9, 8.0, 32, 32)
    traj = np.asarray(rec["subjects"][0]["trajectory"])
    assert traj.shape == (9, 4)
    subject = subject_from_record(rec["subjects"][0])
    assert subject == spec.subjects[0]
    image, mask = render_subject(subject, 64, 64, scale=1.5, angle=30)
    assert image.shape == (64, 64, 3) and mask.dtype == bool and 0.02 < mask.mean() < 0.6
    assert np.abs(image[~mask].astype(int) - 128).mean() < 2  # plain gray around (edge pixels blend)
    assert np.abs(image[mask].astype(int) - 128).mean() > 5  # the subject shows


def test_build_embedded_writes_train_and_val_shards(tmp_path: Path) -> None:
    summary = build_embedded(tmp_path / "emb", num_train=6, num_val=2, cfg=SMALL, seed=1, workers=2, maxcount=4,
                             progress=False)
    assert summary["splits"]["train"]["shards"] == ["train-000000.tar", "train-000001.tar"]
    assert (tmp_path / "emb" / ".complete").exists()
    train = read_all(str(tmp_path / "emb" / "train-{000000..000001}.tar"))
    val = read_all(str(tmp_path / "emb" / "val-000000.tar"))
    assert len(train) == 6 and len(val) == 2
    assert len({s["mp4"] for s in train + val}) == 8  # val clips are not train clips
    again = build_embedded(tmp_path / "again", num_train=6, num_val=2, cfg=SMALL, seed=1, workers=1, maxcount=4,
                           progress=False)
    assert again["splits"] == summary["splits"]
    for name in ("train-000000.tar", "train-000001.tar", "val-000000.tar"):  # same bytes, any worker count
        assert (tmp_path / "emb" / name).read_bytes() == (tmp_path / "again" / name).read_bytes()
    meta = json.loads(train[0]["json"])
    assert meta["source"].startswith("synthetic:")
    for s in train:  # one product-photo reference + mask per subject: the set doubles as a triplet set
        n = len(json.loads(s["json"])["subjects"])
        assert {f"ref{j}.png" for j in range(n)} | {f"ref{j}.mask.png" for j in range(n)} <= set(s)
        assert f"ref{n}.png" not in s


def test_checked_in_test_shard_is_small_and_complete() -> None:
    shard = ROOT / "data" / "test" / "tiny-000000.tar"
    assert shard.stat().st_size < 1_000_000
    samples = read_all(str(shard))
    assert len(samples) == 6
    for s in samples:
        assert {"mp4", "txt", "json", "ref0.png", "ref0.mask.png"} <= set(s)
        assert probe(s["mp4"]).frames == 17
