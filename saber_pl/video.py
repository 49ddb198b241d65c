"""Video decoding and encoding with PyAV: clips at a target fps, resized and centre-cropped.

Training reads short clips (e.g. 81 frames at 16 fps) out of longer source videos at any frame rate.
`decode_clip` seeks to the keyframe before the clip instead of decoding the whole file, steps
through the source frames at `source_fps / fps` and converts only the frames it keeps (PyAV's
swscale does the resize and the RGB conversion in one pass). `encode_mp4` writes h264/yuv420p mp4
bytes for the synthetic data set and the tests.
"""

from __future__ import annotations

import io
import math
import tempfile
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import torch

VIDEO_EXTENSIONS = ("mp4", "mkv", "webm", "avi", "mov")


class VideoError(Exception):
    """A video that cannot be used; `reason` names the skip counter it feeds."""

    reason = "corrupt_video"


class CorruptVideoError(VideoError):
    """The container cannot be opened or holds no decodable video stream."""

    reason = "corrupt_video"


class FrameDecodeError(VideoError):
    """The container opened but a frame the clip needs could not be decoded."""

    reason = "undecodable_frame"


class VideoTooShortError(VideoError):
    """The video holds fewer source frames than the clip spans."""

    reason = "too_short"


@dataclass
class VideoInfo:
    """What a probe learns about a video's first video stream."""

    fps: float  # average frame rate
    frames: int  # frame count (from the container, else estimated from the duration)
    width: int
    height: int
    codec: str
    frames_exact: bool  # False when `frames` is estimated from the duration


Source = bytes | bytearray | memoryview | str | Path


def _open(src: Source) -> av.container.InputContainer:
    """Open a path or in-memory bytes; any FFmpeg error becomes `CorruptVideoError`."""
    try:
        if isinstance(src, (bytes, bytearray, memoryview)):
            return av.open(io.BytesIO(bytes(src)), mode="r")
        return av.open(str(src), mode="r")
    except (av.error.FFmpegError, OSError, ValueError) as exn:
        raise CorruptVideoError(f"cannot open video: {exn}") from exn


def _stream_info(container: av.container.InputContainer) -> tuple[av.video.stream.VideoStream, VideoInfo]:
    """The first video stream and its metadata; raises `CorruptVideoError` if there is none."""
    if not container.streams.video:
        raise CorruptVideoError("no video stream")
    stream = container.streams.video[0]
    rate = stream.average_rate or stream.guessed_rate or stream.base_rate
    if not rate or float(rate) <= 0 or not stream.codec_context.width:
        raise CorruptVideoError("video stream has no frame rate or size")
    fps = float(rate)
    frames, exact = int(stream.frames or 0), True
    if frames <= 0:
        exact = False
        if stream.duration is not None and stream.time_base is not None:
            seconds = float(stream.duration * stream.time_base)
        elif container.duration is not None:
            seconds = container.duration / av.time_base
        else:
            seconds = 0.0
        frames = int(math.floor(seconds * fps + 1e-6))
    ctx = stream.codec_context
    info = VideoInfo(fps, frames, ctx.width, ctx.height, ctx.name, exact)
    return stream, info


def probe(src: Source, decode_first: bool = True) -> VideoInfo:
    """Read a video's metadata (and, if `decode_first`, decode its first frame to prove it is readable)."""
    with _open(src) as container:
        try:
            stream, info = _stream_info(container)
            if decode_first:
                next(container.decode(stream))
        except StopIteration as exn:
            raise CorruptVideoError("video stream has no frames") from exn
        except av.error.FFmpegError as exn:
            raise CorruptVideoError(f"cannot decode video: {exn}") from exn
    if info.frames <= 0:
        raise CorruptVideoError("video has no frames")
    return info


def clip_indices(source_frames: int, source_fps: float, num_frames: int, fps: float, start: int) -> np.ndarray:
    """Source frame indices of a clip of `num_frames` at `fps` starting at source frame `start`."""
    step = source_fps / fps
    return start + np.floor(np.arange(num_frames) * step + 1e-6).astype(np.int64)  # [F]


def clip_span(source_fps: float, num_frames: int, fps: float) -> int:
    """How many source frames a clip covers (first to last kept frame, inclusive)."""
    return int(clip_indices(10**9, source_fps, num_frames, fps, 0)[-1]) + 1


def _scaled_size(width: int, height: int, out_w: int, out_h: int) -> tuple[int, int]:
    """Size that covers (out_w, out_h) keeping the aspect ratio (for a centre crop afterwards)."""
    scale = max(out_w / width, out_h / height)
    return max(out_w, round(width * scale)), max(out_h, round(height * scale))


def _to_rgb(frame: av.VideoFrame, out_w: int, out_h: int) -> np.ndarray:
    """Resize (area filter down, bicubic up) and centre-crop one frame to uint8 [H, W, 3]."""
    sw, sh = _scaled_size(frame.width, frame.height, out_w, out_h)
    interp = "AREA" if sw <= frame.width else "BICUBIC"
    # threads=1: swscale's default (0 = one slice thread per CPU) keeps a thread pool in PyAV's cached scaler;
    # a DataLoader worker forked from a process that decoded before inherits it without its threads and hangs
    # for ever freeing it (PyAV 18.1.1, libswscale 9.5.103: test_datamodule after any decode in the parent).
    rgb = frame.to_ndarray(width=sw, height=sh, format="rgb24", interpolation=interp, threads=1)  # [sh, sw, 3]
    top, left = (sh - out_h) // 2, (sw - out_w) // 2
    return rgb[top : top + out_h, left : left + out_w]


def decode_clip(
    src: Source,
    num_frames: int,
    fps: float,
    height: int,
    width: int,
    rng: np.random.Generator | None = None,
    start: int | None = None,
    threads: int = 1,
) -> torch.Tensor:
    """Decode `num_frames` frames at `fps` from a random start (or `start`): uint8 [F, 3, H, W].

    Raises `VideoTooShortError` if the video spans fewer source frames than the clip,
    `CorruptVideoError` if it cannot be opened and `FrameDecodeError` if a needed frame is missing.
    """
    with _open(src) as container:
        stream, info = _stream_info(container)
        span = clip_span(info.fps, num_frames, fps)
        if info.frames < span:
            raise VideoTooShortError(f"video has {info.frames} frames at {info.fps:.3g} fps, the clip needs {span}")
        if start is None:
            rng = rng if rng is not None else np.random.default_rng()
            start = int(rng.integers(0, info.frames - span + 1))
        elif not 0 <= start <= info.frames - span:
            raise VideoTooShortError(f"start {start} + span {span} exceeds {info.frames} frames")
        wanted = clip_indices(info.frames, info.fps, num_frames, fps, start)  # [F], non-decreasing
        stream.thread_type = "AUTO" if threads != 1 else "SLICE"
        stream.thread_count = max(0, threads)
        out = _decode_indices(container, stream, info, wanted, width, height)
    return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).contiguous()  # [F, 3, H, W]


def _decode_indices(
    container: av.container.InputContainer,
    stream: av.video.stream.VideoStream,
    info: VideoInfo,
    wanted: np.ndarray,
    width: int,
    height: int,
) -> list[np.ndarray]:
    """Seek to the keyframe before `wanted[0]`, decode forward and keep the wanted frames in order."""
    tb = stream.time_base
    t0 = stream.start_time or 0
    first_t = Fraction(int(wanted[0]), 1) / Fraction(info.fps).limit_denominator(1_000_000)
    if wanted[0] > 0 and tb:
        container.seek(t0 + int(first_t / tb), stream=stream, backward=True, any_frame=False)
    out: list[np.ndarray] = []
    pos = 0  # next entry of `wanted` to fill
    try:
        for frame in container.decode(stream):
            if frame.pts is None or not tb:
                raise FrameDecodeError("frame without a timestamp")
            index = round(float((frame.pts - t0) * tb) * info.fps)
            if index < wanted[pos]:
                continue
            # a source frame may serve several clip frames (fps above the source rate);
            # a gap in the stream (dropped frame) is filled by the next decoded frame.
            rgb = None
            while pos < len(wanted) and wanted[pos] <= index:
                rgb = _to_rgb(frame, width, height) if rgb is None else rgb
                out.append(rgb)
                pos += 1
            if pos == len(wanted):
                return out
    except av.error.FFmpegError as exn:
        raise FrameDecodeError(f"decoding failed at clip frame {pos}: {exn}") from exn
    if info.frames_exact:
        raise FrameDecodeError(f"stream ended after {pos} of {len(wanted)} clip frames")
    raise VideoTooShortError(f"stream ended after {pos} of {len(wanted)} clip frames (estimated length)")


def encode_mp4(
    frames: torch.Tensor | np.ndarray,
    fps: float,
    crf: int = 18,
    preset: str = "veryfast",
    gop: int | None = None,
    faststart: bool = False,
) -> bytes:
    """Encode uint8 frames [F, 3, H, W] or [F, H, W, 3] as h264/yuv420p mp4 bytes (even sizes only).

    `gop` sets the keyframe interval (None = x264's default), `faststart` puts the index first.
    """
    arr = frames.numpy() if isinstance(frames, torch.Tensor) else np.asarray(frames)
    if arr.dtype != np.uint8 or arr.ndim != 4:
        raise ValueError(f"frames must be uint8 [F, 3, H, W] or [F, H, W, 3], got {arr.dtype} {arr.shape}")
    if arr.shape[1] == 3 and arr.shape[-1] != 3:
        arr = arr.transpose(0, 2, 3, 1)
    arr = np.ascontiguousarray(arr)  # [F, H, W, 3]
    h, w = arr.shape[1:3]
    if h % 2 or w % 2:
        raise ValueError(f"yuv420p needs even height and width, got {h}x{w}")
    if not faststart:
        buf = io.BytesIO()
        _encode_into(buf, arr, fps, crf, preset, gop, {})
        return buf.getvalue()
    # moving the index to the front rewrites the file: FFmpeg needs a real path for that
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "clip.mp4"
        _encode_into(str(path), arr, fps, crf, preset, gop, {"movflags": "+faststart"})
        return path.read_bytes()


def _encode_into(target: io.BytesIO | str, arr: np.ndarray, fps: float, crf: int, preset: str, gop: int | None,
                 options: dict[str, str]) -> None:
    """Mux uint8 [F, H, W, 3] frames as h264/yuv420p into an mp4 file or buffer."""
    h, w = arr.shape[1:3]
    with av.open(target, mode="w", format="mp4", options=options) as container:
        stream = container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1001))
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        # mbtree off: with x264's macroblock-tree rate control the same frames gave different bytes from run
        # to run here; without it the output is reproducible (checked-in test shard, embedded data set).
        stream.options = {"crf": str(crf), "preset": preset, "mbtree": "0",
                          **({"g": str(gop), "keyint_min": str(gop)} if gop else {})}
        stream.thread_count = 1
        for i, rgb in enumerate(arr):
            frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
            frame.pts = i
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
