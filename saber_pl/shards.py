"""Pack videos with captions (and optional references) into WebDataset tar shards.

One sample per clip: the encoded video bytes untouched (member named by the file's extension,
e.g. ``mp4``), the caption (``txt``) and a small ``json`` (fps, frames, width, height, source).
Triplet samples (for the ``r2v_triplets`` ablation) also carry ``ref0.png``, ``ref0.mask.png``,
``ref1.png`` ... Every video is probed with PyAV in worker processes first; unreadable ones are
skipped and listed in ``<out>/report.json``.

    python -m saber_pl.shards VIDEO_DIR --out shards/ [--captions list.csv|list.jsonl] [--maxcount 1000]
    python -m saber_pl.shards --captions triplets.jsonl --out shards/   # rows: path, caption, refs, masks

Captions come from a sidecar ``<name>.txt`` next to each video, or from a CSV (columns ``path``,
``caption``) or JSONL (keys ``path``, ``caption``, optional ``refs``, ``masks``); relative paths are
resolved against the list's folder, then against VIDEO_DIR.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import re
import sys
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path

import webdataset as wds
from PIL import Image
from tqdm import tqdm

from saber_pl.video import VIDEO_EXTENSIONS, VideoError, probe


@dataclass
class PackItem:
    """One video to pack, with its caption and optional reference images and masks."""

    path: Path
    caption: str | None  # None = no caption found (the item is skipped and reported)
    refs: list[Path] = field(default_factory=list)
    masks: list[Path] = field(default_factory=list)


def find_videos(root: str | Path) -> list[Path]:
    """All video files (by extension) under `root`, sorted."""
    exts = {f".{e}" for e in VIDEO_EXTENSIONS}
    return sorted(p for p in Path(root).rglob("*") if p.is_file() and p.suffix.lower() in exts)


def sidecar_items(root: str | Path) -> list[PackItem]:
    """Videos under `root` with captions from `<name>.txt` sidecars (None when missing)."""
    items = []
    for path in find_videos(root):
        txt = path.with_suffix(".txt")
        items.append(PackItem(path, txt.read_text(encoding="utf-8").strip() if txt.exists() else None))
    return items


def _resolve(p: str, bases: Sequence[Path]) -> Path:
    path = Path(p).expanduser()
    if path.is_absolute():
        return path
    for base in bases:
        if (base / path).exists():
            return base / path
    return bases[0] / path


def manifest_items(manifest: str | Path, root: str | Path | None = None) -> list[PackItem]:
    """Items from a CSV (path, caption) or JSONL (path, caption, refs?, masks?) list."""
    manifest = Path(manifest)
    bases = [manifest.parent] + ([Path(root)] if root else [])
    if manifest.suffix.lower() == ".csv":
        with manifest.open(newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
    else:
        rows = [json.loads(line) for line in manifest.read_text(encoding="utf-8").splitlines() if line.strip()]
    items = []
    for i, row in enumerate(rows):
        if "path" not in row:
            raise ValueError(f"{manifest}: row {i} has no 'path'")
        caption = row.get("caption")
        items.append(PackItem(
            _resolve(row["path"], bases),
            caption.strip() if isinstance(caption, str) else None,
            [_resolve(r, bases) for r in row.get("refs") or []],
            [_resolve(m, bases) for m in row.get("masks") or []],
        ))
    return items


@dataclass
class ProbeResult:
    """What the probe of one item found (picklable, returned by the worker processes)."""

    index: int
    info: dict | None  # fps, frames, width, height, codec when readable
    reason: str | None  # skip reason when not
    error: str | None


def probe_item(args: tuple[int, PackItem]) -> ProbeResult:
    """Probe one item's video (decode its first frame) and reference images; never raises."""
    index, item = args
    if item.caption is None:
        return ProbeResult(index, None, "missing_caption", f"no caption for {item.path}")
    if item.masks and len(item.masks) != len(item.refs):
        return ProbeResult(index, None, "bad_reference", f"{len(item.refs)} refs but {len(item.masks)} masks")
    try:
        info = probe(item.path)
    except VideoError as exn:
        return ProbeResult(index, None, exn.reason, str(exn))
    for p in [*item.refs, *item.masks]:
        try:
            with Image.open(p) as im:
                im.load()
        except Exception as exn:  # PIL raises many types for unreadable images
            return ProbeResult(index, None, "bad_reference", f"{p}: {exn}")
    return ProbeResult(index, {"fps": info.fps, "frames": info.frames, "width": info.width,
                               "height": info.height, "codec": info.codec}, None, None)


def sample_key(path: Path, root: Path | None, used: set[str]) -> str:
    """A unique WebDataset key for `path`: its relative path without extension, dots and slashes -> '_'."""
    try:
        rel = path.relative_to(root) if root else Path(path.name)
    except ValueError:
        rel = Path(path.name)
    key = re.sub(r"[^A-Za-z0-9_-]+", "_", str(rel.with_suffix(""))).strip("_") or "clip"
    base, n = key, 1
    while key in used:
        key, n = f"{base}_{n}", n + 1
    used.add(key)
    return key


def _png(path: Path, mode: str) -> bytes:
    """An image file as PNG bytes in `mode` ("RGB" for references, "L" for masks)."""
    with Image.open(path) as im:
        buf = io.BytesIO()
        im.convert(mode).save(buf, format="PNG")
    return buf.getvalue()


def item_sample(item: PackItem, info: dict, key: str, source: str) -> dict:
    """The shard sample of a probed item: video bytes under its extension, txt, json, refs."""
    sample = {
        "__key__": key,
        item.path.suffix.lower().lstrip("."): item.path.read_bytes(),
        "txt": (item.caption or "").encode(),
        "json": json.dumps({**info, "source": source}).encode(),
    }
    for i, ref in enumerate(item.refs):
        sample[f"ref{i}.png"] = _png(ref, "RGB")
        if item.masks:
            sample[f"ref{i}.mask.png"] = _png(item.masks[i], "L")
    return sample


def write_samples(samples: Iterable[dict], pattern: str, maxcount: int = 1000, maxsize: float = 1e9) -> list[str]:
    """Write samples with `wds.ShardWriter` (reproducible tars, mtime 0); return the shard paths."""
    shards: list[str] = []
    writer = None
    try:
        for sample in samples:
            if writer is None:  # ShardWriter opens a shard at once: only create it with a sample to write
                writer = wds.ShardWriter(pattern, maxcount=maxcount, maxsize=maxsize, verbose=0,
                                         post=shards.append, encoder=False, mtime=0.0)
            writer.write(sample)
    finally:
        if writer is not None:
            writer.close()
    return shards


def pack(
    items: Sequence[PackItem],
    out: str | Path,
    prefix: str = "shard",
    root: str | Path | None = None,
    maxcount: int = 1000,
    maxsize: float = 1e9,
    workers: int = 2,
    progress: bool = True,
) -> dict:
    """Probe `items` in `workers` processes, write the readable ones to `<out>/<prefix>-%06d.tar`.

    Returns the report (also written to `<out>/report.json`): written count, shards, and the
    skipped items with their reason ("missing_caption", "corrupt_video", ...) and error.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    root = Path(root) if root else None
    jobs = list(enumerate(items))
    if workers > 1 and len(jobs) > 1:
        with get_context("fork").Pool(workers) as pool:
            results = list(tqdm(pool.imap(probe_item, jobs, chunksize=4), total=len(jobs), desc="probe",
                                disable=not progress))
    else:
        results = [probe_item(j) for j in tqdm(jobs, desc="probe", disable=not progress)]
    skipped = [{"path": str(items[r.index].path), "reason": r.reason, "error": r.error}
               for r in results if r.info is None]
    good = [r for r in results if r.info is not None]
    used: set[str] = set()

    def samples() -> Iterable[dict]:
        for r in tqdm(good, desc="write", disable=not progress):
            item = items[r.index]
            source = str(item.path.relative_to(root)) if root and item.path.is_relative_to(root) else item.path.name
            yield item_sample(item, r.info, sample_key(item.path, root, used), source)

    shards = write_samples(samples(), str(out / f"{prefix}-%06d.tar"), maxcount=maxcount, maxsize=maxsize)
    report = {
        "total": len(items),
        "written": len(good),
        "skipped": len(skipped),
        "skipped_by_reason": dict(sorted(Counter(s["reason"] for s in skipped).items())),
        "shards": [Path(s).name for s in shards],
        "skipped_items": skipped,
    }
    (out / "report.json").write_text(json.dumps(report, indent=1))
    return report


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("videos", nargs="?", help="folder of videos (sidecar <name>.txt captions unless --captions)")
    p.add_argument("--captions", help="CSV (path,caption) or JSONL (path,caption[,refs,masks]) list")
    p.add_argument("--out", required=True, help="output folder for the shards and report.json")
    p.add_argument("--prefix", default="shard", help="shard names: <prefix>-000000.tar ...")
    p.add_argument("--maxcount", type=int, default=1000, help="samples per shard at most")
    p.add_argument("--maxsize", type=float, default=1e9, help="bytes per shard at most")
    p.add_argument("--workers", type=int, default=2, help="probe processes")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    if not args.videos and not args.captions:
        p.error("give a video folder, a --captions list, or both")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    items = manifest_items(args.captions, args.videos) if args.captions else sidecar_items(args.videos)
    root = Path(args.videos) if args.videos else Path(args.captions).parent
    report = pack(items, args.out, args.prefix, root, args.maxcount, args.maxsize, args.workers, not args.no_progress)
    print(json.dumps({k: report[k] for k in ("total", "written", "skipped", "skipped_by_reason", "shards")}))
    for s in report["skipped_items"]:
        print(f"skipped {s['path']}: {s['reason']}: {s['error']}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
