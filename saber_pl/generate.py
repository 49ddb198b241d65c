"""Reference-to-video generation from a trained Saber checkpoint: ``python -m saber_pl.generate``.

    python -m saber_pl.generate --ckpt runs/saber_full-mini --ref dog.png --ref park.jpg:scene \\
        --prompt "a dog runs across a park" --out samples/dog.mp4
    python -m saber_pl.generate --ckpt runs/saber_full-14B/export --wan-dir /ckpt/Wan2.1-T2V-14B-Diffusers \\
        --birefnet-dir /ckpt/BiRefNet --ref person.jpg --ref cup.jpg --mask - --mask cup_mask.png \\
        --prompts-file prompts.txt --out samples/person.mp4      # samples/person_<i>.mp4, one per prompt

``--ckpt`` is a run folder (``runs/<exp>-<scale>``: its ``config.yaml`` and ``checkpoints/last.ckpt``,
a file or an FSDP2 sharded folder; EMA weights when the run kept them, ``--raw`` for the trained ones),
a checkpoint inside a run, or a folder written by ``python -m saber_pl.export``. At 1.3B/14B the VAE and
umT5 come from ``--wan-dir`` (or $WAN_DIR); at tiny/mini they are random and rebuilt from ``model.seed``
exactly as in training. References are prepared as at training time (``saber_pl.references``: subject
cut out on gray, aspect kept, padded), sampled with ``saber_pl.sampling`` (UniPC/Euler, Wan's shift,
CFG on the text) and decoded by the VAE. Every input is checked before any model is loaded; a bad one
exits with code 2 and a message naming it. Writes ``out.mp4`` (h264, yuv420p), ``out_grid.png``
(references, then a few frames per prompt) and the prepared references ``out_ref<k>.png``.

Library use (the OpenS2V harness, benchmarks)::

    gen = Generator.from_checkpoint("runs/saber_full-mini")
    refs, masks = prepare_references([Reference("dog.png")], ReferenceConfig(height=64, width=64))
    video = gen.generate(["a dog"], refs, masks, VideoSpec(64, 64, 9, 8.0), SamplerConfig(steps=20), seed=0)
    # [1, 3, 9, 64, 64] in [-1, 1]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from saber_pl import wan
from saber_pl.config import ConfigError, from_dict, load_config
from saber_pl.datamodule import DataConfig
from saber_pl.dit import SaberTransformer
from saber_pl.references import Reference, ReferenceConfig, prepare_references, save_references
from saber_pl.sampling import SCHEDULERS, SampleConfig, SamplerConfig, sample_latents
from saber_pl.video import encode_mp4
from saber_pl.wan import ModelConfig, PixelAutoencoder, TextEncoder, VideoVAE

log = logging.getLogger("saber_pl.generate")

WAN21_VAE = {"dim_mult": [1, 2, 4, 4], "temperal_downsample": [False, True, True], "patch_size": None}


@dataclass
class VideoSpec:
    """Size and timing of the generated video (defaults: the paper's 832x480, 81 frames, 16 fps)."""

    height: int = 480  # pixels; a multiple of the VAE's spatial factor x the DiT's patch size
    width: int = 832  # pixels; same constraint
    frames: int = 81  # 1 + 4k (the VAE's temporal factor)
    fps: float = 16.0  # frame rate written into the mp4

    def __post_init__(self) -> None:
        for name in ("height", "width", "frames"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.fps <= 0:
            raise ValueError(f"fps must be > 0, got {self.fps}")


@dataclass
class Limits:
    """What a model accepts, computed from its config alone (no weights)."""

    spatial: int  # VAE spatial factor
    temporal: int  # VAE temporal factor
    patch: int  # DiT spatial patch size
    max_refs: int  # model.max_refs
    rope_len: int  # positions per axis in the DiT's RoPE tables
    ref_rope_offset: int  # reference k sits at temporal position F + offset + k
    scale: str

    def check(self, video: VideoSpec, num_refs: int) -> None:
        """Raise ValueError naming the offending input."""
        if (video.frames - 1) % self.temporal:
            k = max(1, round((video.frames - 1) / self.temporal))
            raise ValueError(f"frames must be of the form {self.temporal}k+1 (e.g. {self.temporal * k + 1}), "
                             f"got {video.frames}")
        step = self.spatial * self.patch
        if video.height % step or video.width % step:
            raise ValueError(f"height and width must be multiples of {step} (VAE factor {self.spatial} x patch "
                             f"{self.patch}) at scale {self.scale}, got {video.height}x{video.width}")
        if num_refs > self.max_refs:
            raise ValueError(f"{num_refs} references given, but the model accepts at most model.max_refs="
                             f"{self.max_refs}")
        lat_frames = 1 + (video.frames - 1) // self.temporal
        longest = max(lat_frames + self.ref_rope_offset + num_refs, video.height // step, video.width // step)
        if longest > self.rope_len:
            raise ValueError(f"video too large for the DiT's RoPE tables ({self.rope_len} positions per axis): "
                             f"{video.frames} frames + {num_refs} references at {video.height}x{video.width}")


def vae_factors(model: ModelConfig) -> tuple[int, int]:
    """(spatial, temporal) factor of a scale's autoencoder, from its config only.

    Same formulas as `VideoVAE`: 2^(len(dim_mult)-1) x patch_size and 2^sum(temperal_downsample) for a
    Wan VAE (tiny: x8, x4; real scales read `wan_dir/vae/config.json`, else Wan2.1's x8, x4), and the
    pixel autoencoder's own factors at mini (x2, x4).
    """
    spec = model.spec
    if "pixel" in spec.vae:
        pixel = PixelAutoencoder(spatial_factor=spec.vae["pixel"])  # no weights: free to build
        return pixel.spatial_factor, pixel.temporal_factor
    vae = dict(WAN21_VAE)
    if spec.vae:
        vae |= spec.vae
    elif spec.pretrained:
        root = model.wan_dir or os.environ.get("WAN_DIR")
        path = Path(root) / "vae" / "config.json" if root else None
        if path is not None and path.is_file():
            vae |= {k: v for k, v in json.loads(path.read_text()).items() if k in WAN21_VAE}
    spatial = 2 ** (len(vae["dim_mult"]) - 1) * (vae["patch_size"] or 1)
    return spatial, 2 ** sum(bool(x) for x in vae["temperal_downsample"])


def model_limits(model: ModelConfig) -> Limits:
    spatial, temporal = vae_factors(model)
    dit = model.spec.dit
    return Limits(spatial, temporal, int(dit["patch_size"][1]), model.max_refs, int(dit["rope_max_seq_len"]),
                  model.ref_rope_offset, model.scale)


# ----------------------------------------------------------------------------------------------- sources


@dataclass
class CheckpointSource:
    """What `--ckpt` points at, read from config files only (no weights are touched)."""

    kind: Literal["run", "export"]
    root: Path  # run folder, or exported diffusers folder
    ckpt: Path | None  # run: the checkpoint file / sharded folder
    model: ModelConfig
    data: DataConfig | None  # the run's data section: default size, frames, fps
    ema: bool  # run: the checkpoint holds `dit_ema.*`; export: the folder holds EMA weights
    saber: dict | None = None  # export: SaberTransformer kwargs from saber.json
    sample: SampleConfig | None = None  # the run's sampling defaults (steps, CFG, scheduler)

    def video_defaults(self) -> VideoSpec:
        d = self.data or DataConfig()
        return VideoSpec(d.height, d.width, d.num_frames, d.fps)

    def sample_defaults(self) -> SampleConfig:
        return self.sample or SampleConfig()


def _find_run_dir(ckpt: Path) -> Path | None:
    for parent in ckpt.resolve().parents:
        if (parent / "config.yaml").is_file():
            return parent
    return None


def _is_checkpoint(path: Path) -> bool:
    return path.is_file() or (path / ".metadata").is_file() or (path / "meta.pt").is_file()


def resolve_checkpoint(path: str | Path, wan_dir: str | None = None) -> CheckpointSource:
    """Classify a run folder, a checkpoint in a run, or an exported folder; FileNotFoundError if none."""
    from saber_pl.checkpoint import find_resume_checkpoint
    from saber_pl.export import load_run_config

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.is_dir() and (path / "saber.json").is_file():
        meta = json.loads((path / "saber.json").read_text())
        model = from_dict(ModelConfig, meta["model"], "model")
        try:  # an older export lacks the data / sample sections: the defaults of its experiment and scale
            defaults = load_config(meta.get("experiment", "saber_full"), model.scale)
        except (ConfigError, FileNotFoundError):
            defaults = None
        # the run's data section (size, frames, fps) and sampling defaults, recorded by export
        data = from_dict(DataConfig, meta["data"], "data") if "data" in meta else defaults and defaults.data
        sample = from_dict(SampleConfig, meta["sample"], "sample") if "sample" in meta else defaults and defaults.sample
        source = CheckpointSource("export", path, None, model, data, meta.get("source") == "dit_ema", meta["saber"],
                                  sample)
    else:
        if path.is_dir() and (path / "config.yaml").is_file():
            run_dir = path
            ckpt = find_resume_checkpoint(path / "checkpoints")
            if ckpt is None:
                raise FileNotFoundError(f"checkpoint not found: no last.ckpt in {path / 'checkpoints'} (train first)")
        elif _is_checkpoint(path):
            run_dir, ckpt = _find_run_dir(path), path
            if run_dir is None:
                raise FileNotFoundError(f"no config.yaml above checkpoint {path}: pass the run folder or an export")
        else:
            raise FileNotFoundError(f"checkpoint not found: {path} is neither a run folder (config.yaml), "
                                    "a checkpoint, nor an exported folder (saber.json)")
        cfg = load_run_config(run_dir)
        source = CheckpointSource("run", run_dir, ckpt, cfg.model, cfg.data, cfg.optim.ema, sample=cfg.sample)
    if wan_dir:
        source.model = dataclasses.replace(source.model, wan_dir=str(wan_dir))
    return source


def check_source(source: CheckpointSource, raw: bool) -> None:
    """Inputs a load needs beyond the checkpoint: `wan_dir` at real scales, raw weights in an export."""
    if source.model.spec.pretrained:
        wan.resolve_wan_dir(source.model, ("vae", "text_encoder", "tokenizer"))
    if raw and source.kind == "export" and source.ema:
        raise ValueError(f"--raw: {source.root} holds EMA weights; export the run with --raw, or pass the run")


# ----------------------------------------------------------------------------------------------- loading


def load_frozen(model: ModelConfig, device: str | torch.device, dtype: torch.dtype) -> tuple[VideoVAE, TextEncoder]:
    """The VAE (float32) and text encoder: from `wan_dir` at 1.3B/14B, rebuilt from `model.seed` at tiny/mini.

    The real-scale branch is `build_components`' minus the DiT: loading a 14B transformer only to drop it
    would cost minutes and tens of GB.
    """
    if model.spec.pretrained:
        root = wan.resolve_wan_dir(model, ("vae", "text_encoder", "tokenizer"))
        vae, text = wan.load_pretrained_frozen(root, model.resolved_text_len, dtype)
    else:  # random parts: the same seeds and call order as training (the small DiT it also builds is dropped)
        comps = wan.build_components(model)
        vae, text = comps.vae, comps.text_encoder
        text.to(dtype=dtype)
    return vae.to(device), text.to(device)


def load_run_dit(source: CheckpointSource, raw: bool, dtype: torch.dtype) -> tuple[SaberTransformer, str]:
    """The run's DiT with its EMA (or, with `raw`, trained) weights, materialised from the meta device."""
    from saber_pl.export import checkpoint_state, dit_weights

    dit = cast_like_pretrained(wan.meta_transformer(source.model), dtype).to_empty(device="cpu")
    template = {f"dit.{k}": v for k, v in dit.state_dict().items()}
    if source.ema:
        template |= {f"dit_ema.{k}": v for k, v in dit.state_dict().items()}
    weights, prefix = dit_weights(checkpoint_state(source.ckpt, template), prefer_ema=not raw)
    dit.load_state_dict(weights, strict=True)
    return wan.rebuild_rope(dit), prefix


def cast_like_pretrained(dit: SaberTransformer, dtype: torch.dtype) -> SaberTransformer:
    """Parameters to `dtype`, except those diffusers' `from_pretrained(torch_dtype=...)` keeps in float32
    (`_keep_in_fp32_modules`: time embedder, modulation tables, norms; same name rule), so a run and its
    export compute alike. Done before loading, so the float32 ones are never rounded."""
    keep = getattr(dit.wan, "_keep_in_fp32_modules", None) or []
    for name, param in dit.wan.named_parameters():
        fp32 = dtype != torch.float32 and any(k in name.split(".") for k in keep)
        param.data = param.data.to(torch.float32 if fp32 else dtype)
    return dit


def load_export_dit(source: CheckpointSource, dtype: torch.dtype) -> SaberTransformer:
    from diffusers import WanTransformer3DModel

    model = WanTransformer3DModel.from_pretrained(source.root, torch_dtype=dtype, local_files_only=True)
    # The weights arrive as views into the memory-mapped safetensors file, at offsets only 8-byte aligned: the
    # CPU matmul kernels then take other code paths (results differ by ~1e-6 from the run's). Own copies, in
    # the allocator's 64-byte-aligned memory, make the export compute exactly like the run it came from.
    for tensor in [*model.parameters(), *model.buffers()]:
        tensor.data = tensor.data.clone()
    return SaberTransformer(model, **source.saber)


def default_dtype(device: str | torch.device) -> torch.dtype:
    """bf16 on CUDA (how the real scales train), float32 elsewhere."""
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


# ----------------------------------------------------------------------------------------------- generator


class Generator:
    """A loaded Saber model (DiT + VAE + text encoder) that turns prompts and references into videos."""

    def __init__(self, dit: SaberTransformer, vae: VideoVAE, text_encoder: TextEncoder, limits: Limits,
                 defaults: VideoSpec | None = None, sample: SampleConfig | None = None) -> None:
        self.dit = dit.eval().requires_grad_(False)
        self.vae, self.text_encoder = vae, text_encoder
        self.limits = limits
        self.defaults = defaults or VideoSpec()
        self.sample = sample or SampleConfig()  # the run's sampling defaults (reference_size for references)
        self.device = dit.wan.patch_embedding.weight.device
        self.dtype = dit.wan.patch_embedding.weight.dtype  # compute dtype (some norms stay float32)
        # umT5-xxl is 11.4 GB in bf16: on a GPU it leaves the device once the prompts are encoded, so the
        # DiT's passes have the memory (moved back for the next call's prompts).
        self.offload_text_encoder = self.device.type == "cuda"

    @classmethod
    def from_checkpoint(cls, path: str | Path, wan_dir: str | None = None, device: str | torch.device = "cpu",
                        raw: bool = False, dtype: torch.dtype | None = None) -> Generator:
        """Load a run folder, a checkpoint in a run, or an exported folder (see the module docstring)."""
        source = resolve_checkpoint(path, wan_dir)
        check_source(source, raw)
        return cls.from_source(source, device, raw, dtype)

    @classmethod
    def from_source(cls, source: CheckpointSource, device: str | torch.device = "cpu", raw: bool = False,
                    dtype: torch.dtype | None = None) -> Generator:
        dtype = dtype or default_dtype(device)
        if source.kind == "run":
            dit, prefix = load_run_dit(source, raw, dtype)
            log.info("loaded %s weights from %s", prefix, source.ckpt)
        else:
            dit = load_export_dit(source, dtype)
            log.info("loaded exported DiT from %s", source.root)
        vae, text = load_frozen(source.model, device, dtype)
        return cls(dit.to(device), vae, text, model_limits(source.model), source.video_defaults(),
                   source.sample_defaults())

    # ------------------------------------------------------------------ encoding
    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> Tensor:
        """umT5 embeddings, zero past each prompt  # [B, L, D] on the DiT's device."""
        if next(self.text_encoder.parameters()).device != self.device:
            self.text_encoder.to(self.device)
        ids, mask = self.text_encoder.tokenize(list(prompts))
        return self.text_encoder.encode(ids, mask).to(self.device, self.dtype)

    def release_text_encoder(self) -> None:
        """Move umT5 off the GPU (to host memory) when `offload_text_encoder`; a no-op otherwise."""
        if self.offload_text_encoder:
            self.text_encoder.to("cpu")
            if torch.cuda.is_available():
                torch.cuda.empty_cache()

    @torch.no_grad()
    def encode_references(self, refs: Tensor, masks: Tensor) -> tuple[Tensor, Tensor]:
        """As `SaberModule.encode_references`: each reference a one-frame video; coverage per latent pixel.

        refs [K, 3, H, W] in [-1, 1], masks [K, 1, H, W] -> latents [K, C, h, w], coverage [K, 1, h, w].
        """
        fs = self.vae.spatial_factor
        vae_dtype = next(self.vae.parameters(), self.vae.latents_mean).dtype
        lat = self.vae.encode(refs.to(self.device, vae_dtype).unsqueeze(2))[:, :, 0]  # [K, C, h, w]
        coverage = F.avg_pool2d(masks.to(self.device).float(), fs)  # [K, 1, h, w]
        return lat.to(self.dtype), coverage.to(self.dtype)

    def initial_noise(self, shape: tuple[int, ...], seed: int) -> Tensor:
        """Gaussian noise, sample i seeded with seed + i on the CPU (same video alone, in a batch, on any device)."""
        gens = [torch.Generator().manual_seed(seed + i) for i in range(shape[0])]
        return torch.stack([torch.randn(shape[1:], generator=g) for g in gens])  # [B, C, f, h, w]

    # ------------------------------------------------------------------ sampling
    @torch.no_grad()
    def generate(self, prompts: list[str], refs: Tensor | None, masks: Tensor | None, video: VideoSpec | None = None,
                 sampler: SamplerConfig | None = None, seed: int = 0, negative_prompt: str = "",
                 progress: bool = True) -> Tensor:
        """Videos for `prompts` sharing the references  # refs [K, 3, H, W], masks [K, 1, H, W] -> [B, 3, F, H, W].

        `refs` come from `prepare_references` at the video size; None = no references (text only).
        Output in [-1, 1], float32, on the CPU.
        """
        video = video or self.defaults
        sampler = sampler or SamplerConfig()
        if not prompts:
            raise ValueError("at least one prompt is needed")
        k = 0 if refs is None else refs.shape[0]
        self.limits.check(video, k)
        if refs is not None and (tuple(refs.shape[-2:]) != (video.height, video.width) or masks is None
                                 or masks.shape != (k, 1, video.height, video.width)):
            raise ValueError(f"refs [K, 3, {video.height}, {video.width}] and masks [K, 1, ...] must match the "
                             f"video size, got {tuple(refs.shape)} and {None if masks is None else tuple(masks.shape)}")
        b = len(prompts)
        text = self.encode_prompts(prompts)  # [B, L, D]
        neg = self.encode_prompts([negative_prompt]).expand(b, -1, -1)  # [B, L, D]
        self.release_text_encoder()  # before the DiT's passes: they are the memory peak
        ref_lat = ref_cov = counts = None
        if k:
            lat, cov = self.encode_references(refs, masks)
            ref_lat = lat.unsqueeze(0).expand(b, -1, -1, -1, -1)  # [B, K, C, h, w]
            ref_cov = cov.unsqueeze(0).expand(b, -1, -1, -1, -1)  # [B, K, 1, h, w]
            counts = torch.full((b,), k, dtype=torch.long, device=self.device)
        fs, ft = self.vae.spatial_factor, self.vae.temporal_factor
        shape = (b, self.vae.latent_channels, 1 + (video.frames - 1) // ft, video.height // fs, video.width // fs)
        noise = self.initial_noise(shape, seed)
        latents = sample_latents(self.dit, shape, text, neg, ref_lat, ref_cov, counts, sampler, progress=progress,
                                 noise=noise)  # [B, C, f, h, w]
        vae_dtype = next(self.vae.parameters(), self.vae.latents_mean).dtype
        # one video at a time: decoding 81 frames at 480p is the memory peak at the real scales
        out = [self.vae.decode(z[None].to(vae_dtype)).float().clamp(-1, 1).cpu() for z in latents]
        return torch.cat(out)  # [B, 3, F, H, W]

    def generate_to_file(self, prompts: list[str], references: list[Reference | str], out: str | Path,
                         video: VideoSpec | None = None, sampler: SamplerConfig | None = None, seed: int = 0,
                         negative_prompt: str = "", refs_cfg: ReferenceConfig | None = None, batch_size: int = 1,
                         save_extras: bool = True, progress: bool = True) -> list[Path]:
        """Prepare the references, generate, write one mp4 per prompt (+ grid and references). -> mp4 paths."""
        video = video or self.defaults
        self.limits.check(video, len(references))
        refs_cfg = _refs_config(refs_cfg or ReferenceConfig(subject_size=self.sample.reference_size), video,
                                self.limits.max_refs)
        refs, masks = prepare_references(list(references), refs_cfg)  # [K, 3, H, W], [K, 1, H, W]
        return generate_files(self, prompts, refs, masks, out, video, sampler or SamplerConfig(), seed,
                              negative_prompt, batch_size, save_extras, progress)


def generate_files(gen: Generator, prompts: list[str], refs: Tensor | None, masks: Tensor | None, out: str | Path,
                   video: VideoSpec, sampler: SamplerConfig, seed: int = 0, negative_prompt: str = "",
                   batch_size: int = 1, save_extras: bool = True, progress: bool = True) -> list[Path]:
    """Generate `prompts` in batches of `batch_size` (prompt i seeded with seed + i) and write the files.

    refs / masks None = text-only: no reference images are written and the grid has no reference row.
    """
    paths = output_paths(out, len(prompts))
    videos = []
    for i in range(0, len(prompts), batch_size):
        chunk = gen.generate(prompts[i : i + batch_size], refs, masks, video, sampler, seed + i, negative_prompt,
                             progress)  # [b, 3, F, H, W]
        for j, v in enumerate(chunk):
            write_video(v, paths[i + j], video.fps)
        videos.append(chunk)
    if save_extras:
        if refs is not None:
            save_references(refs, masks, out)
        save_grid(refs, torch.cat(videos), grid_path(out))
    return paths


def _refs_config(cfg: ReferenceConfig | None, video: VideoSpec, max_refs: int) -> ReferenceConfig:
    cfg = cfg or ReferenceConfig()
    return dataclasses.replace(cfg, height=video.height, width=video.width, max_references=max_refs)


# ----------------------------------------------------------------------------------------------- outputs


def output_paths(out: str | Path, n: int) -> list[Path]:
    """`out` for one prompt, `<stem>_<i><suffix>` for a batch."""
    out = Path(out)
    return [out] if n == 1 else [out.with_name(f"{out.stem}_{i}{out.suffix}") for i in range(n)]


def grid_path(out: str | Path) -> Path:
    out = Path(out)
    return out.with_name(f"{out.stem}_grid.png")


def to_uint8(video: Tensor) -> Tensor:
    """[-1, 1] float -> uint8, any layout."""
    return ((video.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def write_video(video: Tensor, path: str | Path, fps: float) -> Path:
    """Write one video [3, F, H, W] in [-1, 1] as h264/yuv420p mp4 (via a temp file, so no half file remains)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = encode_mp4(to_uint8(video).permute(1, 0, 2, 3).contiguous(), fps)  # [F, 3, H, W]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    tmp.replace(path)
    return path


def save_grid(refs: Tensor | None, videos: Tensor, path: str | Path, frames: int = 4, pad: int = 2) -> Path:
    """PNG: the references in the first row, then `frames` evenly spaced frames of each video per row.

    refs [K, 3, H, W] (None: no reference row), videos [B, 3, F, H, W], both in [-1, 1] at the same size. Written by hand: torchvision
    (`make_grid`) is not available here and the layout is a few lines.
    """
    h, w = videos.shape[-2:]
    idx = np.linspace(0, videos.shape[2] - 1, min(frames, videos.shape[2])).round().astype(int)
    rows = ([list(refs)] if refs is not None else []) + [[v[:, i] for i in idx] for v in videos]
    cols = max(len(r) for r in rows)
    canvas = torch.full((3, len(rows) * (h + pad) + pad, cols * (w + pad) + pad), 255, dtype=torch.uint8)
    for r, row in enumerate(rows):
        for c, img in enumerate(row):
            top, left = pad + r * (h + pad), pad + c * (w + pad)
            canvas[:, top : top + h, left : left + w] = to_uint8(img)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(canvas.permute(1, 2, 0).numpy()).save(path)
    return path


# ----------------------------------------------------------------------------------------------- CLI


def parse_ref(text: str) -> Reference:
    """`PATH`, `PATH:subject` or `PATH:scene`."""
    head, sep, tail = text.rpartition(":")
    if sep and tail in ("subject", "scene"):
        return Reference(head, kind=tail)
    return Reference(text)


def attach_masks(refs: list[Reference], masks: list[str]) -> list[Reference]:
    """The i-th `--mask` belongs to the i-th `--ref` (`-` = none for that one)."""
    if len(masks) > len(refs):
        raise ValueError(f"{len(masks)} --mask given for {len(refs)} --ref")
    for ref, mask in zip(refs, masks):
        if mask in ("-", ""):
            continue
        if ref.kind == "scene":
            raise ValueError(f"--mask {mask} given for scene reference {ref.path} (scenes are used whole)")
        if not Path(mask).is_file():
            raise FileNotFoundError(f"mask file not found: {mask} (for reference {ref.path})")
        ref.mask_path = mask
    return refs


def read_prompts(prompts: list[str], prompts_file: str | None) -> list[str]:
    out = list(prompts)
    if prompts_file:
        path = Path(prompts_file)
        if not path.is_file():
            raise FileNotFoundError(f"prompts file not found: {path}")
        out += [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not out:
        raise ValueError("no prompt: give --prompt TEXT (repeatable) or --prompts-file FILE")
    return out


def add_model_args(p: argparse.ArgumentParser) -> None:
    """Flags shared with `python -m saber_pl.eval generate`: checkpoint, size, sampler, references."""
    p.add_argument("--ckpt", required=True, help="run folder, checkpoint in a run, or exported folder")
    p.add_argument("--wan-dir", default=None, help="local Wan2.1 diffusers folder (VAE, umT5) at 1.3B/14B; or $WAN_DIR")
    p.add_argument("--raw", action="store_true", help="use the trained weights `dit.*`, not the EMA")
    p.add_argument("--birefnet-dir", default=None, help="local BiRefNet folder to segment subject references")
    p.add_argument("--negative-prompt", default="", help="text of the unconditional CFG branch")
    p.add_argument("--height", type=int, default=None, help="default: the run's data.height")
    p.add_argument("--width", type=int, default=None, help="default: the run's data.width")
    p.add_argument("--frames", type=int, default=None, help="4k+1; default: the run's data.num_frames")
    p.add_argument("--fps", type=float, default=None, help="default: the run's data.fps")
    p.add_argument("--steps", type=int, default=None, help="default: the run's sample.steps (50, the paper's)")
    p.add_argument("--guidance", type=float, default=None,
                   help="CFG scale on the text (1 = off); default: the run's sample.guidance (5.0, Wan's; mini: 1.0)")
    p.add_argument("--guidance-interval", type=float, nargs=2, default=None, metavar=("LO", "HI"),
                   help="guide only the steps at noise levels t in [LO, HI]; default: the run's sample.guidance_interval "
                        "(0 1: every step)")
    p.add_argument("--shift", type=float, default=None,
                   help="flow shift; default: the run's flow.shift (what it trained with; 5.0, Wan's, for an export)")
    p.add_argument("--scheduler", choices=SCHEDULERS, default=None, help="default: the run's sample.scheduler (unipc)")
    p.add_argument("--drop-refs-uncond", action="store_true", help="drop the references in the unconditional branch")
    p.add_argument("--reference-guidance", type=float, default=None, metavar="SCALE",
                   help="guidance on the references alone: a pass of the prompt without references (1 = off); "
                        "default: the run's sample.reference_guidance")
    p.add_argument("--reference-size", type=reference_size_arg, default=None, metavar="FRACTION|fit",
                   help="show each subject reference with its bounding box at FRACTION of the frame's shorter side, "
                        "centred; 'fit' = the paper's fit of the whole image; default: the run's sample.reference_size "
                        "(mini: 0.35, a little below the size its training clips show subjects at; other scales: fit)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default="auto",
                   help="DiT / umT5 dtype (auto: bf16 on CUDA, float32 otherwise; the VAE stays float32)")


def reference_size_arg(text: str) -> float:
    """--reference-size: 'fit' -> 0.0 (the paper's fit; `subject_size` None), else a fraction in (0, 1]."""
    if text == "fit":
        return 0.0
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a fraction in (0, 1] or 'fit', got {text!r}") from None
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a fraction in (0, 1] or 'fit', got {text!r}")
    return value


def subject_size(args: argparse.Namespace, source: CheckpointSource) -> float | None:
    """The subject size references are prepared at: the flag ('fit' = None), else the run's sample.reference_size."""
    flag = getattr(args, "reference_size", None)
    if flag is None:
        return source.sample_defaults().reference_size
    return flag or None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m saber_pl.generate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    p.add_argument("--prompt", action="append", default=[], help="prompt (repeatable: a batch sharing the references)")
    p.add_argument("--prompts-file", default=None, help="one prompt per line")
    p.add_argument("--ref", action="append", default=[], help="reference image PATH[:subject|:scene] (repeatable)")
    p.add_argument("--mask", action="append", default=[], help="mask of the i-th --ref (> 127 = subject; '-' = none)")
    p.add_argument("--seed", type=int, default=0, help="noise seed (prompt i of a batch uses seed + i)")
    p.add_argument("--batch-size", type=int, default=1, help="prompts sampled together")
    p.add_argument("--out", default="out.mp4", help="output mp4 (out_<i>.mp4 for several prompts)")
    return p.parse_args(argv)


def request_from_args(args: argparse.Namespace, source: CheckpointSource) -> tuple[VideoSpec, SamplerConfig]:
    """Video size and sampler settings (flags over the run's defaults), validated."""
    d = source.video_defaults()
    video = VideoSpec(args.height or d.height, args.width or d.width, args.frames or d.frames, args.fps or d.fps)
    shift = args.shift if args.shift is not None else default_shift(source)
    interval = tuple(args.guidance_interval) if getattr(args, "guidance_interval", None) else None
    sampler = source.sample_defaults().sampler(shift, steps=args.steps, guidance=args.guidance,
                                               scheduler=args.scheduler, drop_refs_uncond=args.drop_refs_uncond,
                                               guidance_interval=interval,
                                               reference_guidance=getattr(args, "reference_guidance", None))
    return video, sampler


def default_shift(source: CheckpointSource) -> float:
    """The flow shift a run trained with (a mini run: 1.0, the real scales: 5.0); Wan's 5.0 for an export."""
    from saber_pl.export import load_run_config

    return load_run_config(source.root).flow.shift if source.kind == "run" else SamplerConfig().shift


def torch_dtype(name: str, device: str) -> torch.dtype:
    return default_dtype(device) if name == "auto" else getattr(torch, name)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    args = parse_args(argv)
    try:  # every check that needs no model, before any model is built
        if not str(args.out).endswith(".mp4"):
            raise ValueError(f"--out must end in .mp4, got {args.out}")
        if args.batch_size < 1:
            raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
        prompts = read_prompts(args.prompt, args.prompts_file)
        refs = attach_masks([parse_ref(r) for r in args.ref], args.mask)  # none = text-only (T2V)
        source = resolve_checkpoint(args.ckpt, args.wan_dir)
        check_source(source, args.raw)
        video, sampler = request_from_args(args, source)
        limits = model_limits(source.model)
        limits.check(video, len(refs))
        refs_cfg = ReferenceConfig(height=video.height, width=video.width, birefnet_dir=args.birefnet_dir,
                                   device=args.device, max_references=limits.max_refs,
                                   subject_size=subject_size(args, source))
        ref_images = ref_masks = None  # no --ref: text-only, the model keeps its T2V ability
        if refs:
            ref_images, ref_masks = prepare_references(refs, refs_cfg)  # segmentation: empty masks fail here
    except (FileNotFoundError, ValueError) as err:  # ConfigError is a ValueError
        print(f"error: {err}", file=sys.stderr)
        return 2
    gen = Generator.from_source(source, args.device, args.raw, torch_dtype(args.dtype, args.device))
    paths = generate_files(gen, prompts, ref_images, ref_masks, args.out, video, sampler, args.seed,
                           args.negative_prompt, args.batch_size)
    print("\n".join(str(p) for p in [*paths, grid_path(args.out)]))
    return 0

if __name__ == "__main__":
    sys.exit(main())
