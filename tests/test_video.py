"""video.py: clip decoding (frame stepping, seeking, resize + crop) against a plain full decode, and errors."""

from __future__ import annotations

import io

import av
import numpy as np
import pytest
import torch

from saber_pl.video import (
    CorruptVideoError,
    FrameDecodeError,
    VideoTooShortError,
    clip_indices,
    clip_span,
    decode_clip,
    encode_mp4,
    probe,
)


def ramp_video(frames: int, height: int = 32, width: int = 32) -> np.ndarray:
    """Frame i is a flat gray of level 10 + 6 i, with a bright square moving right: uint8 [F, H, W, 3]."""
    x = np.zeros((frames, height, width, 3), np.uint8)
    for i in range(frames):
        x[i] = 10 + 6 * i
        x[i, 4:10, i % (width - 6) : i % (width - 6) + 6] = 250
    return x


def full_decode(data: bytes) -> np.ndarray:
    """Reference: decode every frame in order, no seeking: uint8 [N, H, W, 3]."""
    with av.open(io.BytesIO(data)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


@pytest.fixture(scope="module")
def ramp() -> bytes:
    return encode_mp4(ramp_video(40), fps=24, gop=6)  # keyframes every 6 frames: seeking lands mid-stream


def test_probe_reads_metadata(ramp: bytes) -> None:
    info = probe(ramp)
    assert (info.fps, info.frames, info.width, info.height, info.codec) == (24.0, 40, 32, 32, "h264")


def test_clip_indices_step_through_the_source_rate() -> None:
    idx = clip_indices(100, source_fps=24, num_frames=9, fps=16, start=5)
    assert idx.tolist() == [5 + int(np.floor(i * 1.5 + 1e-6)) for i in range(9)]
    assert clip_span(24, 81, 16) == 121  # 81 frames at 16 fps from 24 fps cover 5 s + one frame
    assert clip_indices(100, 16, 5, 16, 0).tolist() == [0, 1, 2, 3, 4]
    assert clip_indices(100, 8, 5, 16, 0).tolist() == [0, 0, 1, 1, 2]  # above the source rate: repeats


@pytest.mark.parametrize("start", [0, 7, 13, 22])
def test_seeking_decode_equals_full_decode(ramp: bytes, start: int) -> None:
    ref = full_decode(ramp)
    clip = decode_clip(ramp, num_frames=9, fps=16, height=32, width=32, start=start)
    assert clip.shape == (9, 3, 32, 32) and clip.dtype == torch.uint8
    want = ref[clip_indices(40, 24, 9, 16, start)]  # [F, H, W, 3]
    assert torch.equal(clip, torch.from_numpy(want).permute(0, 3, 1, 2))


def test_random_start_is_seeded_and_in_range(ramp: bytes) -> None:
    ref = full_decode(ramp)
    a = decode_clip(ramp, 9, 16, 32, 32, rng=np.random.default_rng(3))
    b = decode_clip(ramp, 9, 16, 32, 32, rng=np.random.default_rng(3))
    assert torch.equal(a, b)
    starts = [s for s in range(40 - clip_span(24, 9, 16) + 1)
              if torch.equal(a, torch.from_numpy(ref[clip_indices(40, 24, 9, 16, s)]).permute(0, 3, 1, 2))]
    assert len(starts) == 1


def test_resize_and_centre_crop() -> None:
    x = np.zeros((6, 32, 96, 3), np.uint8)  # green middle third, red left and blue right thirds
    x[:, :, :32, 0] = 255
    x[:, :, 32:64, 1] = 255
    x[:, :, 64:, 2] = 255
    data = encode_mp4(x, 8, crf=0)
    same = decode_clip(data, 6, 8, 32, 32, start=0)  # scale 1: the crop keeps only the green third
    assert same[:, 1, :, 4:-4].float().mean() > 240 and same[:, [0, 2], :, 4:-4].float().max() < 40
    up = decode_clip(data, 6, 8, 64, 64, start=0)  # x2 upscale, then the same crop
    assert up.shape == (6, 3, 64, 64) and up[:, 1, :, 8:-8].float().mean() > 240
    down = decode_clip(data, 6, 8, 16, 48, start=0)  # /2, whole width kept
    assert down.shape == (6, 3, 16, 48)
    assert down[:, 0, :, :12].float().mean() > 200 and down[:, 2, :, -12:].float().mean() > 200


def test_too_short_video_raises(ramp: bytes) -> None:
    with pytest.raises(VideoTooShortError, match="the clip needs 61") as err:
        decode_clip(ramp, num_frames=41, fps=16, height=32, width=32)  # span 61 > 40 frames
    assert err.value.reason == "too_short"


def test_corrupt_and_truncated_videos_raise_with_their_reason(ramp: bytes) -> None:
    with pytest.raises(CorruptVideoError) as err:
        decode_clip(b"\x00garbage" * 64, 5, 16, 32, 32)
    assert err.value.reason == "corrupt_video"
    with pytest.raises(CorruptVideoError):
        decode_clip(ramp[: len(ramp) // 2], 5, 16, 32, 32)  # moov atom at the end: lost
    front = encode_mp4(ramp_video(40), fps=24, gop=6, faststart=True)  # index first: frames lost instead
    assert probe(front).frames == 40
    with pytest.raises(FrameDecodeError) as err:
        decode_clip(front[: len(front) * 2 // 3], 9, 16, 32, 32, start=25)
    assert err.value.reason == "undecodable_frame"


def test_encode_accepts_both_layouts_and_rejects_odd_sizes() -> None:
    x = ramp_video(4)
    a = encode_mp4(x, 8, crf=0)
    b = encode_mp4(torch.from_numpy(x).permute(0, 3, 1, 2), 8, crf=0)
    assert a == b and probe(a).frames == 4


def test_encoding_is_reproducible() -> None:
    from saber_pl.synthetic import SyntheticConfig, clip_seed, render_clip, sample_clip_spec

    # a clip whose bytes varied from run to run with x264's default rate control (mbtree)
    x = render_clip(sample_clip_spec(clip_seed(0, "tiny", 0), SyntheticConfig(num_frames=17, height=64, width=64)))
    first = encode_mp4(x, 16, crf=20)
    assert all(encode_mp4(x.copy(), 16, crf=20) == first for _ in range(12))
    with pytest.raises(ValueError, match="even"):
        encode_mp4(np.zeros((2, 31, 32, 3), np.uint8), 8)
    with pytest.raises(ValueError, match="uint8"):
        encode_mp4(np.zeros((2, 32, 32, 3), np.float32), 8)


def _decode_into(queue, data: bytes) -> None:  # a forked child: what a DataLoader worker does
    queue.put(decode_clip(data, 9, 24.0, 16, 16, start=0).shape)


def test_a_worker_forked_after_the_parent_decoded_still_decodes(ramp: bytes) -> None:
    """DataLoader workers are forked; with swscale's default thread pool (PyAV 18.1.1) a child forked after the
    parent had decoded hung for ever in the scaler (CI stuck in test_datamodule). The child must finish."""
    import multiprocessing as mp

    parent = decode_clip(ramp, 9, 24.0, 16, 16, start=0)  # the parent scales first (its cached scaler is inherited)
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_decode_into, args=(queue, ramp))
    child.start()
    child.join(timeout=60)
    if child.is_alive():
        child.kill()
        pytest.fail("a forked child hung decoding after the parent decoded")
    assert child.exitcode == 0 and queue.get(timeout=5) == tuple(parent.shape)
