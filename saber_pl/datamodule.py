"""Video-text WebDataset shards -> training batches of clips, masked-reference inputs and tokens.

Per sample, in the DataLoader worker: decode a clip (video.py), pick K in [refs_min, refs_max]
frames of it as references and draw K masks (masks.py), tokenize and drop captions for CFG.
``source="triplets"`` reads the references and masks stored with the sample instead. With
``text="precomputed"`` / ``latents="cached"`` the umT5 embeddings / the clip's VAE latents (and a few of
its frames, the reference pool) come from sidecar shards joined by key (sidecars.py), so the training
ranks never run umT5 nor the 81-frame VAE encode. On the device,
``on_after_batch_transfer`` turns uint8 into [-1, 1] and runs the reference augmentation
(augment.py) batched. Bad input (corrupt or short videos, broken tars, missing members) is skipped
and counted per reason; the counts travel with every batch and ``skip_counts()`` sums them.

Splitting: shards are dealt out to (rank, worker) pairs (no sample read twice in a pass); when a
pass has fewer shards than readers, every reader reads every shard and keeps every n-th sample.
``resampled=True`` draws shards with replacement forever, seeded per (seed, rank, worker, epoch).
"""

from __future__ import annotations

import io
import re
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from itertools import islice
from typing import Any, Literal

import lightning as L
import numpy as np
import torch
import webdataset as wds
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from saber_pl.augment import AugmentConfig, ReferenceAugment
from saber_pl.faults import dataloader_worker_init
from saber_pl.masks import MaskConfig, MaskGenerator
from saber_pl.paths import shipped_path
from saber_pl.shuffle import bounded_shuffle
from saber_pl.sidecars import LATENT_MEMBER, TEXT_MEMBER, caption_digest, joined_samples, load_empty_text, read_tensor
from saber_pl.video import VIDEO_EXTENSIONS, VideoError, decode_clip

SKIP_REASONS = ("broken_tar", "missing_video", "missing_caption", "corrupt_video", "undecodable_frame",
                "too_short", "bad_reference", "missing_text", "missing_latent")
COUNTED = (*SKIP_REASONS, "empty_caption")  # empty captions are kept (unconditional samples) but counted
Tokenize = Callable[[list[str]], tuple[Tensor, Tensor]]


@dataclass
class DataConfig:
    """Where the shards are and how clips, references and batches are made."""

    train_shards: str | None = None  # path, brace pattern or URL (pipe:...); several joined by '::' or ','
    val_shards: str | None = None  # same, for validation (None = no validation data)
    source: Literal["video_text", "triplets"] = "video_text"  # triplets: references stored in the sample
    # online: umT5 on every rank encodes each caption; precomputed: embeddings from text_sidecars (no umT5)
    text: Literal["online", "precomputed"] = "online"
    text_sidecars: str | None = None  # folder or URL with {name} of data/precompute_text.py's output
    # online: the VAE encodes each decoded clip; cached: the first window's latents + 8 of its frames
    latents: Literal["online", "cached"] = "online"
    latent_sidecars: str | None = None  # folder or URL with {name} of data/cache_latents.py's output
    num_frames: int = 81  # frames per clip (paper: 81)
    fps: float = 16.0  # clip frame rate, sampled from the source fps by frame-index stepping (paper: 16)
    height: int = 480  # clip height after resize + centre crop (paper: 480)
    width: int = 832  # clip width (paper: 832)
    refs_min: int = 1  # K drawn per clip in [refs_min, refs_max] (ours: 1..3)
    refs_max: int = 3  # 0 = no references (text-to-video baseline)
    batch_size: int = 1  # clips per device per step (paper: global batch 64)
    val_batch_size: int | None = None  # validation batch (None = batch_size)
    num_workers: int = 4  # DataLoader worker processes per device
    shuffle_buffer: int = 100  # raw (still encoded) samples in each worker's shuffle buffer (train only)
    shuffle_buffer_mb: float = 512.0  # ... and at most this many MB of them (encoded videos vary 100x in size)
    resampled: bool = True  # train: draw shards with replacement, an infinite stream
    split: Literal["auto", "shard", "sample"] = "auto"  # how readers share a non-resampled pass
    epoch_batches: int | None = None  # train batches per rank and epoch (None = one pass; infinite if resampled)
    caption_dropout: float = 0.0  # probability of an empty caption (classifier-free guidance)
    max_skip_fraction: float = 0.5  # raise when a worker's failed fraction exceeds this ...
    min_samples_before_raise: int = 64  # ... after it has seen at least this many samples
    decode_threads: int = 1  # FFmpeg threads per decode (1 = leave the parallelism to the workers)
    seed: int = 0  # seeds shard order, shuffling, K, frames, masks and caption dropout

    def __post_init__(self) -> None:
        for name in ("num_frames", "height", "width", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"data.{name} must be >= 1, got {getattr(self, name)}")
        if self.fps <= 0:
            raise ValueError(f"data.fps must be > 0, got {self.fps}")
        if self.refs_max < 0 or not 0 <= self.refs_min <= self.refs_max:
            raise ValueError(f"data.refs_min/refs_max need 0 <= refs_min <= refs_max, "
                             f"got {self.refs_min}, {self.refs_max}")
        if self.epoch_batches is not None and self.epoch_batches < 1:
            raise ValueError(f"data.epoch_batches must be >= 1 or null, got {self.epoch_batches}")
        if self.val_batch_size is not None and self.val_batch_size < 1:
            raise ValueError(f"data.val_batch_size must be >= 1 or null, got {self.val_batch_size}")
        if self.shuffle_buffer_mb <= 0:
            raise ValueError(f"data.shuffle_buffer_mb must be > 0, got {self.shuffle_buffer_mb}")
        if self.num_workers < 0 or self.shuffle_buffer < 0 or self.decode_threads < 0:
            raise ValueError("data.num_workers, data.shuffle_buffer and data.decode_threads must be >= 0")
        if not 0.0 <= self.caption_dropout <= 1.0:
            raise ValueError(f"data.caption_dropout must be in [0, 1], got {self.caption_dropout}")
        if not 0.0 < self.max_skip_fraction <= 1.0:
            raise ValueError(f"data.max_skip_fraction must be in (0, 1], got {self.max_skip_fraction}")
        if self.min_samples_before_raise < 1:
            raise ValueError(f"data.min_samples_before_raise must be >= 1, got {self.min_samples_before_raise}")
        if self.source not in ("video_text", "triplets"):
            raise ValueError(f"data.source must be 'video_text' or 'triplets', got {self.source!r}")
        if self.split not in ("auto", "shard", "sample"):
            raise ValueError(f"data.split must be 'auto', 'shard' or 'sample', got {self.split!r}")
        if self.text not in ("online", "precomputed") or self.latents not in ("online", "cached"):
            raise ValueError(f"data.text must be 'online' or 'precomputed' and data.latents 'online' or 'cached', "
                             f"got {self.text!r}, {self.latents!r}")
        if self.text == "precomputed" and not self.text_sidecars:
            raise ValueError("data.text=precomputed needs data.text_sidecars (the folder data/precompute_text.py wrote)")
        if self.latents == "cached" and not self.latent_sidecars:
            raise ValueError("data.latents=cached needs data.latent_sidecars (the folder data/cache_latents.py wrote)")

    def sidecar_templates(self) -> list[str]:
        """The sidecar locations joined to every shard (text first, then latents)."""
        return [t for t, on in ((self.text_sidecars, self.text == "precomputed"),
                                (self.latent_sidecars, self.latents == "cached")) if on and t]


def expand_shards(spec: str) -> list[str]:
    """Shard URLs from '::' or ',' separated brace patterns (commas inside braces belong to the pattern).

    A relative path missing from the CWD is looked up in the checkout or the installed copy (paths.py).
    """
    parts = re.split(r"::|,(?![^{]*\})", spec)
    urls = [shipped_path(u) for p in parts if p.strip() for u in wds.shardlists.expand_urls(p.strip())]
    if not urls:
        raise ValueError(f"no shards in {spec!r}")
    return urls


class SkipSample(Exception):
    """A sample that cannot be used; `reason` is one of SKIP_REASONS."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


class SkipCounter:
    """Per-worker counts of skipped samples by reason; raises once too large a fraction fails."""

    def __init__(self, max_fraction: float, min_seen: int) -> None:
        self.max_fraction, self.min_seen = max_fraction, min_seen
        self.counts: Counter[str] = Counter()
        self.bad_shards: Counter[str] = Counter()
        self.seen = 0

    def ok(self) -> None:
        self.seen += 1

    def note(self, reason: str) -> None:
        """Count a non-fatal event (an empty caption)."""
        self.counts[reason] += 1

    def skip(self, reason: str, url: str | None) -> None:
        self.counts[reason] += 1
        self.bad_shards[url or "?"] += 1
        self.seen += 1
        failed = sum(self.counts[r] for r in SKIP_REASONS)
        if self.seen >= self.min_seen and failed > self.max_fraction * self.seen:
            shards = ", ".join(f"{u} ({n})" for u, n in self.bad_shards.most_common(10))
            raise RuntimeError(f"{failed} of {self.seen} samples failed ({dict(self.counts)}), more than the "
                               f"max_skip_fraction {self.max_fraction}; failures by shard: {shards}")

    def tar_error(self, exn: Exception) -> bool:
        """WebDataset handler for tar-level errors: count and continue."""
        url = next((a for a in reversed(exn.args) if isinstance(a, str) and a != str(exn.args[0])), None)
        self.skip("broken_tar", url)
        return True

    def snapshot(self) -> dict[str, int]:
        return {**{r: self.counts[r] for r in COUNTED}, "seen": self.seen}


def fit_pad(image: Image.Image, height: int, width: int, fill: int) -> np.ndarray:
    """Resize keeping the aspect ratio to fit (height, width) and pad centred with `fill`: uint8 [H, W, C]."""
    scale = min(height / image.height, width / image.width)
    w, h = max(1, round(image.width * scale)), max(1, round(image.height * scale))
    resample = Image.Resampling.BILINEAR if image.mode == "L" else Image.Resampling.BICUBIC
    canvas = Image.new(image.mode, (width, height), fill if image.mode == "L" else (fill,) * 3)
    canvas.paste(image.resize((w, h), resample, reducing_gap=None), ((width - w) // 2, (height - h) // 2))
    return np.asarray(canvas)


def _reference_members(raw: dict) -> list[str]:
    """Member names `ref<i>.<png|jpg|...>` of a triplet sample, by index."""
    refs = [(int(m.group(1)), k) for k in raw if (m := re.fullmatch(r"ref(\d+)\.(png|jpg|jpeg|webp)", k))]
    return [k for _, k in sorted(refs)]


def caption_of(raw: dict) -> str | None:
    """A raw sample's caption as training reads it (None: no `txt` member); the text tool encodes the same."""
    return raw["txt"].decode("utf-8", errors="replace").strip() if "txt" in raw else None


class SampleMaker:
    """Raw tar members -> one training sample (decoded clip or cached latents, references, masks, caption,
    and with precomputed text the caption's stored embedding [L_i, D])."""

    def __init__(self, cfg: DataConfig, mask_cfg: MaskConfig, text_len: int | None = None) -> None:
        self.cfg = cfg
        self.masks = MaskGenerator(mask_cfg)
        self.text_len = text_len
        self._empty_text: Tensor | None = None

    def __call__(self, raw: dict, rng: np.random.Generator, counter: SkipCounter) -> dict:
        cfg = self.cfg
        key = raw.get("__key__", "?")
        cached = cfg.latents == "cached"
        ext = next((e for e in VIDEO_EXTENSIONS if e in raw), None)
        if ext is None and not cached:
            raise SkipSample("missing_video", key)
        caption = caption_of(raw)
        if caption is None:
            raise SkipSample("missing_caption", key)
        text = self._stored_text(raw, caption) if cfg.text == "precomputed" else None
        if cached:  # the first window's latents; references are drawn from its stored frames
            latent, frames = self._cached_clip(raw)
            sample: dict[str, Any] = {"latent": latent}  # [C, f, h, w]
        else:
            try:
                frames = decode_clip(raw[ext], cfg.num_frames, cfg.fps, cfg.height, cfg.width, rng=rng,
                                     threads=cfg.decode_threads)  # [F, 3, H, W]
            except VideoError as exn:
                raise SkipSample(exn.reason, str(exn)) from exn
            except Exception as exn:  # anything else FFmpeg/PyAV throws at a broken file: never stop training
                raise SkipSample("corrupt_video", repr(exn)) from exn
            sample = {"video": frames}
        if cfg.source == "triplets":
            refs, masks = self._stored_references(raw, rng)
        else:
            refs, masks = self._frame_references(frames, rng)
        if not caption:
            counter.note("empty_caption")
        if cfg.caption_dropout > 0 and rng.random() < cfg.caption_dropout:
            caption = ""
            text = self.empty_text() if text is not None else None
        if text is not None:
            sample["text"] = text  # [L_i, D]
        return {"key": raw["__key__"], **sample, "ref_frames": refs, "ref_masks": masks, "caption": caption}

    def empty_text(self) -> Tensor:
        """The stored embedding of the empty caption (caption dropout)  # [L_0, D]."""
        if self._empty_text is None:
            self._empty_text = load_empty_text(self.cfg.text_sidecars)
        return self._empty_text

    def _stored_text(self, raw: dict, caption: str) -> Tensor:
        """The caption's umT5 embedding of its valid tokens from the text sidecar  # [L_i, D]."""
        key = raw.get("__key__", "?")
        if TEXT_MEMBER not in raw:
            raise SkipSample("missing_text", f"{key}: no {TEXT_MEMBER} in the text sidecar of {raw.get('__url__')}")
        emb, meta = read_tensor(raw[TEXT_MEMBER], "emb")
        if meta.get("caption") != caption_digest(caption):
            raise SkipSample("missing_text", f"{key}: the stored embedding is of another caption (stale sidecar)")
        if self.text_len is not None and meta.get("text_len") != self.text_len:
            raise ValueError(f"{key}: text sidecar made with text_len {meta.get('text_len')}, the run uses "
                             f"{self.text_len}: re-run data/precompute_text.py with this run's config")
        return emb

    def _cached_clip(self, raw: dict) -> tuple[Tensor, Tensor]:
        """The stored latents and frames of the clip's cached window: [C, f, h, w], uint8 [n, 3, H, W]."""
        cfg, key = self.cfg, raw.get("__key__", "?")
        if LATENT_MEMBER not in raw:
            raise SkipSample("missing_latent", f"{key}: no {LATENT_MEMBER} in the latent sidecar of {raw.get('__url__')}")
        latent, meta = read_tensor(raw[LATENT_MEMBER], "latent")
        want = {"num_frames": cfg.num_frames, "fps": cfg.fps, "height": cfg.height, "width": cfg.width}
        got = {k: meta.get(k) for k in want}
        if got != want:
            raise ValueError(f"{key}: latents cached for {got}, the run reads {want}: re-run data/cache_latents.py "
                             f"with this run's data config")
        try:
            frames = [np.asarray(Image.open(io.BytesIO(raw[f"frame{j}.png"])).convert("RGB"))
                      for j in range(len(meta["frames"]))]
        except Exception as exn:  # a missing or unreadable stored frame: no reference pool
            raise SkipSample("missing_latent", f"{key}: stored frames: {exn!r}") from exn
        return latent, torch.from_numpy(np.stack(frames)).permute(0, 3, 1, 2).contiguous()

    def _frame_references(self, video: Tensor, rng: np.random.Generator) -> tuple[Tensor, Tensor]:
        """K random frames of the clip and K generated masks: uint8 [K, 3, H, W], bool [K, 1, H, W]."""
        cfg = self.cfg
        k = int(rng.integers(cfg.refs_min, cfg.refs_max + 1)) if cfg.refs_max > 0 else 0
        idx = rng.choice(video.shape[0], size=k, replace=k > video.shape[0])
        masks = [self.masks.sample(cfg.height, cfg.width, rng) for _ in range(k)]
        mask = torch.from_numpy(np.stack(masks)) if k else torch.zeros(0, cfg.height, cfg.width, dtype=torch.bool)
        return video[torch.from_numpy(np.asarray(idx, dtype=np.int64))], mask.bool().unsqueeze(1)

    def _stored_references(self, raw: dict, rng: np.random.Generator) -> tuple[Tensor, Tensor]:
        """The sample's own reference images and masks, fitted into the frame (gray / 0 padding)."""
        cfg = self.cfg
        names = _reference_members(raw)
        if cfg.refs_max == 0:
            names = []
        elif not names:
            raise SkipSample("bad_reference", f"{raw.get('__key__')}: no ref<i>.png members")
        elif len(names) > cfg.refs_max:
            names = [names[i] for i in sorted(rng.choice(len(names), size=cfg.refs_max, replace=False))]
        refs, masks = [], []
        for name in names:
            stem = name.rsplit(".", 1)[0]
            try:
                image = Image.open(io.BytesIO(raw[name])).convert("RGB")
                refs.append(fit_pad(image, cfg.height, cfg.width, 128))
                mask_key = next((k for k in raw if k.startswith(f"{stem}.mask.")), None)
                if mask_key is not None:  # the stored mask, else the whole image (a background reference)
                    mask = Image.open(io.BytesIO(raw[mask_key])).convert("L").resize(image.size)
                else:
                    mask = Image.new("L", image.size, 255)
                masks.append(fit_pad(mask, cfg.height, cfg.width, 0) >= 128)
            except Exception as exn:  # PIL raises many types for broken images
                raise SkipSample("bad_reference", f"{raw.get('__key__')}.{name}: {exn!r}") from exn
        if not refs:
            return (torch.zeros(0, 3, cfg.height, cfg.width, dtype=torch.uint8),
                    torch.zeros(0, 1, cfg.height, cfg.width, dtype=torch.bool))
        ref = torch.from_numpy(np.stack(refs)).permute(0, 3, 1, 2).contiguous()  # [K, 3, H, W]
        return ref, torch.from_numpy(np.stack(masks)).unsqueeze(1)  # [K, 1, H, W]


def collate(samples: list[dict], tokenize: Tokenize | None, text_len: int | None = None) -> dict[str, Any]:
    """Stack samples, zero-padding references to the batch's largest K and stored embeddings to text_len."""
    b = len(samples)
    h, w = samples[0]["ref_frames"].shape[-2:]
    clip: dict[str, Tensor] = {}
    if "video" in samples[0]:
        clip["video"] = torch.stack([s["video"] for s in samples])  # [B, F, 3, H, W]
    else:
        clip["latents"] = torch.stack([s["latent"] for s in samples])  # [B, C, f, h, w]
    counts = torch.tensor([s["ref_frames"].shape[0] for s in samples], dtype=torch.long)  # [B]
    kmax = int(counts.max()) if b else 0
    refs = torch.zeros(b, kmax, 3, h, w, dtype=torch.uint8)
    masks = torch.zeros(b, kmax, 1, h, w, dtype=torch.bool)
    for i, s in enumerate(samples):
        refs[i, : counts[i]] = s["ref_frames"]
        masks[i, : counts[i]] = s["ref_masks"]
    batch: dict[str, Any] = {**clip, "ref_frames": refs, "ref_masks": masks, "ref_counts": counts,
                             "caption": [s["caption"] for s in samples], "key": [s["key"] for s in samples]}
    if "text" in samples[0]:  # zero past each prompt's length, as TextEncoder.encode returns  # [B, L, D]
        if text_len is None:
            raise ValueError("precomputed text embeddings need the run's text_len to be padded to")
        longest = max(s["text"].shape[0] for s in samples)
        if longest > text_len:
            raise ValueError(f"a stored embedding has {longest} tokens, more than text_len {text_len}")
        text = samples[0]["text"].new_zeros(b, text_len, samples[0]["text"].shape[-1])
        for i, s in enumerate(samples):
            text[i, : s["text"].shape[0]] = s["text"]
        batch["text"] = text
    if tokenize is not None:
        ids, mask = tokenize(batch["caption"])
        batch["input_ids"], batch["attention_mask"] = ids.long(), mask.long()  # [B, L]
    return batch


class SaberStream(IterableDataset):
    """One rank's stream of collated batches; each DataLoader worker builds its own WebDataset pipeline."""

    def __init__(self, urls: list[str], cfg: DataConfig, mask_cfg: MaskConfig, tokenize: Tokenize | None,
                 rank: int, world_size: int, train: bool, text_len: int | None = None) -> None:
        super().__init__()
        self.urls, self.cfg, self.mask_cfg, self.tokenize, self.text_len = urls, cfg, mask_cfg, tokenize, text_len
        self.rank, self.world_size, self.train = rank, world_size, train
        self.epoch = 0  # passes started by this copy (a persistent worker keeps its copy across epochs)

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        counter = SkipCounter(self.cfg.max_skip_fraction, self.cfg.min_samples_before_raise)
        quota = self.cfg.epoch_batches
        if not self.train or quota is None:
            yield from self._one_pass(worker, num_workers, counter)
            return
        # A fixed number of batches per rank and epoch (split over the workers), so DDP ranks stay in
        # step even when a finite pass gives them different counts: passes repeat until it is reached.
        quota = quota // num_workers + (1 if worker < quota % num_workers else 0)
        done = 0
        while done < quota:
            before = done
            for batch in self._one_pass(worker, num_workers, counter):
                yield batch
                done += 1
                if done == quota:
                    return
            if done == before:
                raise RuntimeError(f"a whole pass over {len(self.urls)} shard(s) ({self.urls[0]} ...) gave rank "
                                   f"{self.rank} worker {worker} no batch: too little data for "
                                   f"{self.world_size} rank(s) x {num_workers} worker(s)")

    def _one_pass(self, worker: int, num_workers: int, counter: SkipCounter) -> Iterator[dict]:
        """One pass (infinite when resampled) of this reader's WebDataset pipeline."""
        cfg = self.cfg
        epoch = self.epoch if self.train else 0  # validation sees the same clips, frames and masks every time
        self.epoch += 1
        readers, reader = self.world_size * num_workers, self.rank * num_workers + worker
        resampled = self.train and cfg.resampled
        per_sample = not resampled and (cfg.split == "sample" or (cfg.split == "auto" and len(self.urls) < readers))
        stages: list[Any] = []
        if resampled:  # infinite, differently seeded on every (rank, worker); no splitting needed
            stages.append(wds.ResampledShards(self.urls, seed=wds.utils.make_seed(cfg.seed, epoch),
                                              worker_seed=lambda: self.rank * 1000 + worker, deterministic=True))
        else:  # one pass in an order every reader agrees on, then dealt out. (wds.split_by_node and
            # split_by_worker do the same islice but read the rank from the environment only; here it
            # may come from the Trainer or the caller.)
            order = wds.utils.make_seed(cfg.seed, epoch) if self.train else None
            stages.append(wds.SimpleShardList(self.urls, seed=order))
            if not per_sample:
                stages.append(lambda src: islice(src, reader, None, readers))
        # in per-sample mode every reader sees each tar error: only reader 0 counts them
        handler = counter.tar_error if not per_sample or reader == 0 else (lambda exn: True)
        templates = cfg.sidecar_templates()
        if templates:  # sidecar shards joined by key; a cached clip's video bytes are dropped at once
            drop = VIDEO_EXTENSIONS if cfg.latents == "cached" else ()
            stages.append(lambda src: joined_samples(src, templates, handler, drop))
        else:
            stages.append(wds.tarfile_to_samples(handler=handler))
        if per_sample:
            stages.append(lambda src: islice(src, reader, None, readers))
        if self.train and cfg.shuffle_buffer > 1:
            seed = wds.utils.make_seed(cfg.seed, self.rank, worker, epoch, 1)
            max_bytes = max(1, int(cfg.shuffle_buffer_mb * 2**20))
            stages.append(lambda src: bounded_shuffle(src, cfg.shuffle_buffer, max_bytes, seed))
        stages.append(lambda src: self._samples(src, counter, (cfg.seed, self.rank, worker, epoch)))
        bs = cfg.batch_size if self.train else (cfg.val_batch_size or cfg.batch_size)
        stages.append(lambda src: self._batches(src, bs, counter, worker))
        yield from wds.DataPipeline(*stages)

    def _samples(self, src: Iterator[dict], counter: SkipCounter, seed: tuple[int, ...]) -> Iterator[dict]:
        """Decode raw samples with an RNG per (seed, rank, worker, epoch, sample index); skip and count bad ones."""
        maker = SampleMaker(self.cfg, self.mask_cfg, self.text_len)
        for i, raw in enumerate(src):
            rng = np.random.default_rng([*seed, i])
            try:
                sample = maker(raw, rng, counter)
            except SkipSample as exn:
                counter.skip(exn.reason, raw.get("__url__"))
                continue
            counter.ok()
            yield sample

    def _batches(self, src: Iterator[dict], size: int, counter: SkipCounter, worker: int) -> Iterator[dict]:
        """Collate `size` samples at a time; the worker's cumulative skip counts ride along."""
        tag = f"{'train' if self.train else 'val'}/{self.rank}/{worker}"
        buf: list[dict] = []
        for sample in src:
            buf.append(sample)
            if len(buf) == size:
                yield {**collate(buf, self.tokenize, self.text_len), "skips": {tag: counter.snapshot()}}
                buf = []
        if buf and not self.train:  # validation keeps the last partial batch; training keeps shapes fixed
            yield {**collate(buf, self.tokenize, self.text_len), "skips": {tag: counter.snapshot()}}


class SaberDataModule(L.LightningDataModule):
    """Streams shards into batches; augments the references on the device after transfer."""

    def __init__(self, cfg: DataConfig, mask_cfg: MaskConfig | None = None, aug_cfg: AugmentConfig | None = None,
                 tokenize: Tokenize | None = None, rank: int | None = None, world_size: int | None = None,
                 text_len: int | None = None) -> None:
        super().__init__()
        if cfg.text == "precomputed" and text_len is None:
            raise ValueError("data.text=precomputed: pass text_len (model.text_len) to pad the stored embeddings to")
        self.cfg = cfg
        self.text_len = text_len  # tokens per prompt the stored embeddings are padded to (precomputed text)
        self.mask_cfg = mask_cfg if mask_cfg is not None else MaskConfig()
        self.aug_cfg = aug_cfg if aug_cfg is not None else AugmentConfig()
        self.tokenize = tokenize
        self.augment = ReferenceAugment(self.aug_cfg)
        self._rank, self._world_size = rank, world_size
        self._skips: dict[str, dict[str, int]] = {}  # latest cumulative counts per (split, rank, worker)
        self._batches_augmented, self._last_step, self._calls_in_step = 0, -1, 0

    def rank_world(self) -> tuple[int, int]:
        """(rank, world size): explicit, else from the trainer, else torch.distributed, else (0, 1)."""
        if self._rank is not None:
            return self._rank, self._world_size or 1
        if self.trainer is not None:
            return self.trainer.global_rank, self.trainer.world_size
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return torch.distributed.get_rank(), torch.distributed.get_world_size()
        return 0, 1

    def _loader(self, shards: str, train: bool) -> DataLoader:
        rank, world = self.rank_world()
        ds = SaberStream(expand_shards(shards), self.cfg, self.mask_cfg, self.tokenize, rank, world, train,
                         self.text_len)
        nw = self.cfg.num_workers
        return DataLoader(ds, batch_size=None, num_workers=nw, persistent_workers=train and nw > 0,
                          pin_memory=torch.cuda.is_available(), prefetch_factor=2 if nw > 0 else None,
                          worker_init_fn=partial(dataloader_worker_init, rank=rank) if nw > 0 else None)

    def train_dataloader(self) -> DataLoader:
        if not self.cfg.train_shards:
            raise ValueError("data.train_shards is not set")
        return self._loader(self.cfg.train_shards, train=True)

    def val_dataloader(self) -> DataLoader | list:
        return self._loader(self.cfg.val_shards, train=False) if self.cfg.val_shards else []

    def _augment_seed(self) -> int:
        """Seed of one augmentation draw: (seed, rank, global step, call within that step, train/eval).

        Without a trainer (tests, scripts) the step is the number of batches augmented so far.
        """
        trainer = self.trainer
        if trainer is None:
            step, call, training = self._batches_augmented, 0, 1
        else:
            step, training = trainer.global_step, int(trainer.training)
            self._calls_in_step = self._calls_in_step + 1 if step == self._last_step else 0
            self._last_step, call = step, self._calls_in_step
        self._batches_augmented += 1
        rank, _ = self.rank_world()
        return int(np.random.SeedSequence([self.cfg.seed, rank, step, call, training]).generate_state(1)[0])

    def on_after_batch_transfer(self, batch: dict[str, Any], dataloader_idx: int) -> dict[str, Any]:
        """uint8 -> [-1, 1], video to [B, 3, F, H, W], references augmented (gray outside the mask, zero padding)."""
        self._skips.update(batch.pop("skips", {}))
        if "video" in batch:  # absent with cached latents (batch["latents"] [B, C, f, h, w] is used as is)
            video = batch["video"]  # [B, F, 3, H, W] uint8
            batch["video"] = video.permute(0, 2, 1, 3, 4).float().div(127.5).sub(1.0)  # [B, 3, F, H, W]
        frames_u8 = batch.pop("ref_frames")  # [B, K, 3, H, W]
        masks = batch["ref_masks"].float()  # [B, K, 1, H, W]
        counts = batch["ref_counts"]
        b, k = frames_u8.shape[:2]
        refs = torch.zeros(frames_u8.shape, dtype=torch.float32, device=frames_u8.device)
        out_masks = torch.zeros_like(masks)
        valid = torch.arange(k, device=counts.device)[None, :] < counts[:, None]  # [B, K]
        if k > 0 and bool(valid.any()):
            gen = torch.Generator(device=frames_u8.device)
            gen.manual_seed(self._augment_seed())
            frames = frames_u8[valid].float().div(127.5).sub(1.0)  # [N, 3, H, W]
            aug_frames, aug_masks = self.augment.to(frames.device)(frames, masks[valid], generator=gen)
            refs[valid] = aug_frames.to(refs.dtype)
            out_masks[valid] = aug_masks.to(out_masks.dtype)
        batch["refs"], batch["ref_masks"] = refs, out_masks
        return batch

    def skip_counts(self) -> dict[str, int]:
        """Skipped samples per reason (plus empty captions) summed over this process's workers."""
        total = Counter()
        for counts in self._skips.values():
            total.update({r: counts.get(r, 0) for r in COUNTED})
        return {r: int(total[r]) for r in COUNTED}

    def samples_seen(self) -> int:
        """Samples read so far by this process's workers (used and skipped)."""
        return sum(c.get("seen", 0) for c in self._skips.values())
