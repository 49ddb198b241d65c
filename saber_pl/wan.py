"""Model scales and the Wan2.1 components Saber trains on (DiT, VAE, umT5 text encoder, tokenizer).

Scales are one-line factories in `SCALES`, picked by name (DiT-style):

- `tiny`: random in-process models for tests: a 2-layer Wan DiT, a tiny random `AutoencoderKLWan`
  (the real VAE code path), a small random `UMT5EncoderModel` and a byte-level `ByT5Tokenizer()`.
- `mini`: a DiT that trains in minutes on a CPU, with `PixelAutoencoder` (a fixed linear autoencoder:
  Wan-like 4-frame grouping, 2x2 space-to-depth, the 16 largest spectral components; 16 latent
  channels like Wan's VAE, so this DiT has Wan's 16 + 4 + 16 inputs).
- `1.3B` / `14B`: diffusers' Wan2.1 folders loaded from `wan_dir` (or $WAN_DIR), `local_files_only=True`.

    comps = build_components(ModelConfig(scale="tiny", init="t2v"))
    ids, mask = comps.text_encoder.tokenize(["a cat"])
    text = comps.text_encoder.encode(ids, mask)                  # [B, text_len, D_text]
    z = comps.vae.encode(video)                                   # [B, C, 1+k, H/s, W/s], normalised
    v = comps.transformer(z_t, t, text, z_refs, coverage, counts) # velocity on the video frames
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKLWan, WanTransformer3DModel
from diffusers.models.transformers.transformer_wan import WanRotaryPosEmbed
from diffusers.utils import is_accelerate_available
from torch import Tensor, nn
from transformers import AutoTokenizer, ByT5Tokenizer, UMT5Config, UMT5EncoderModel

from saber_pl.dit import SaberTransformer
from saber_pl.tokenizer import WORD_VOCAB, WordHashTokenizer

Scale = Literal["tiny", "mini", "1.3B", "14B"]


@dataclass
class ModelConfig:
    """Which Wan model Saber fine-tunes and how references enter it."""

    scale: Scale = "14B"  # name in SCALES; the paper fine-tunes Wan2.1-14B
    wan_dir: str | None = None  # diffusers Wan2.1 folder (transformer/ vae/ text_encoder/ tokenizer/); or $WAN_DIR
    init: Literal["t2v", "i2v", "random"] = "t2v"  # DiT weights: Wan T2V (widened 16->36), Wan I2V, or random
    ref_timestep: Literal["shared", "zero"] = "shared"  # reference tokens' timestep: the clip's, or 0 (ours)
    # packed attention kernel; auto: varlen (FlashAttention-2, sm80+, bf16), else xformers, else sdpa (the CPU)
    attn_backend: Literal["auto", "varlen", "xformers", "sdpa"] = "auto"
    ref_attn_mask: bool = True  # False = `no_attn_mask` ablation: every token of a real reference is attended
    valid_threshold: float = 0.5  # a reference token is kept when its patch's mean mask coverage >= this (ours)
    mask_threshold: float = 0.5  # mask channels = latent-pixel coverage >= this (ours)
    ref_rope_offset: int = 0  # reference k gets temporal RoPE index F + offset + k (ours: offset 0)
    gradient_checkpointing: bool = True  # recompute each block in backward (needed at 14B)
    max_refs: int = 8  # most references per clip accepted (quality degrades around 12 per the paper)
    text_len: int | None = None  # text tokens per prompt; None = the scale's (512 at 1.3B/14B as Wan pads)
    seed: int = 0  # seed of the random weights of tiny/mini components (identical on every rank)
    # how random DiT weights are drawn (init=random, tiny/mini): the layers' default, or DiT's adaLN-Zero
    random_weights: Literal["default", "adaln_zero"] = "default"
    # what the DiT's output head predicts: Wan's velocity eps - z0, or the clean latent z0 ("sample",
    # JiT-style x-prediction for small random DiTs), turned into the velocity (z_t - z0) / max(t, t_min)
    # inside SaberTransformer, so the loss, the samplers and generate see a velocity either way
    prediction: Literal["velocity", "sample"] = "velocity"
    prediction_t_min: float = 0.05  # prediction=sample: the t below which the division is clamped
    # absolute positions of the video tokens on top of Wan's relative RoPE: none (Wan), or a fixed 3D
    # sin-cos table added after the patch embedding (small random DiTs; SaberTransformer.video_positions)
    position_embedding: Literal["none", "sincos"] = "none"
    # the random umT5's tokenizer (tiny/mini; real scales load umT5's own from wan_dir): bytes (ByT5), or
    # words (one hashed id per word as SentencePiece gives common words; saber_pl.tokenizer)
    tokenizer: Literal["bytes", "words"] = "bytes"

    def __post_init__(self) -> None:
        if self.scale not in SCALES:
            raise ValueError(f"scale must be one of {list(SCALES)}, got {self.scale!r}")
        if self.init not in ("t2v", "i2v", "random"):
            raise ValueError(f"init must be 't2v', 'i2v' or 'random', got {self.init!r}")
        if self.ref_timestep not in ("shared", "zero"):
            raise ValueError(f"ref_timestep must be 'shared' or 'zero', got {self.ref_timestep!r}")
        if self.attn_backend not in ("auto", "varlen", "xformers", "sdpa"):
            raise ValueError(f"attn_backend must be 'auto', 'varlen', 'xformers' or 'sdpa', got {self.attn_backend!r}")
        for name in ("valid_threshold", "mask_threshold"):
            if not 0.0 < getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in (0, 1], got {getattr(self, name)}")
        if self.random_weights not in ("default", "adaln_zero"):
            raise ValueError(f"random_weights must be 'default' or 'adaln_zero', got {self.random_weights!r}")
        if self.prediction not in ("velocity", "sample"):
            raise ValueError(f"prediction must be 'velocity' or 'sample', got {self.prediction!r}")
        if self.position_embedding not in ("none", "sincos"):
            raise ValueError(f"position_embedding must be 'none' or 'sincos', got {self.position_embedding!r}")
        if self.position_embedding != "none" and self.init != "random" and (self.wan_dir or self.spec.pretrained):
            raise ValueError("position_embedding needs init=random: Wan's pretrained weights never saw one")
        if self.tokenizer not in ("bytes", "words"):
            raise ValueError(f"tokenizer must be 'bytes' or 'words', got {self.tokenizer!r}")
        if self.tokenizer != "bytes" and self.spec.pretrained:
            raise ValueError(f"tokenizer={self.tokenizer} is for the random umT5 of tiny/mini: scale "
                             f"{self.scale} loads umT5's own tokenizer from wan_dir")
        if not 0.0 < self.prediction_t_min <= 1.0:
            raise ValueError(f"prediction_t_min must be in (0, 1], got {self.prediction_t_min}")
        if self.prediction == "sample" and self.init != "random" and (self.wan_dir or self.spec.pretrained):
            raise ValueError("prediction=sample needs init=random: Wan's pretrained weights predict the velocity")
        if self.ref_rope_offset < 0:
            raise ValueError(f"ref_rope_offset must be >= 0, got {self.ref_rope_offset}")
        if self.max_refs < 1:
            raise ValueError(f"max_refs must be >= 1, got {self.max_refs}")
        if self.text_len is not None and self.text_len < 1:
            raise ValueError(f"text_len must be >= 1 or None, got {self.text_len}")

    @property
    def spec(self) -> ScaleSpec:
        return SCALES[self.scale]()

    @property
    def resolved_text_len(self) -> int:
        return self.text_len if self.text_len is not None else self.spec.text_len


@dataclass(frozen=True)
class ScaleSpec:
    """What a scale is made of. `dit` holds `WanTransformer3DModel` kwargs in the T2V layout."""

    dit: dict[str, Any]  # WanTransformer3DModel config (in_channels = latent channels)
    text_len: int  # default text tokens per prompt
    pretrained: bool  # load VAE / text encoder / tokenizer (and the DiT unless init=random) from wan_dir
    umt5: dict[str, Any] = field(default_factory=dict)  # random UMT5Config kwargs (not pretrained)
    # random AutoencoderKLWan kwargs; {"pixel": s, ...} = PixelAutoencoder (+ components, latents_mean/std)
    vae: dict[str, Any] = field(default_factory=dict)


def _wan21(heads: int, ffn: int, layers: int) -> dict[str, Any]:
    """Wan2.1 T2V transformer config (diffusers' `transformer/config.json`)."""
    return dict(
        patch_size=(1, 2, 2), num_attention_heads=heads, attention_head_dim=128, in_channels=16, out_channels=16,
        text_dim=4096, freq_dim=256, ffn_dim=ffn, num_layers=layers, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024,
    )


def _small_dit(heads: int, head_dim: int, layers: int, text_dim: int, channels: int, patch: int = 2) -> dict[str, Any]:
    return dict(
        patch_size=(1, patch, patch), num_attention_heads=heads, attention_head_dim=head_dim, in_channels=channels,
        out_channels=channels, text_dim=text_dim, freq_dim=64, ffn_dim=4 * heads * head_dim, num_layers=layers,
        cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=256,
    )


def _umt5(d_model: int, layers: int) -> dict[str, Any]:
    return dict(
        vocab_size=384, d_model=d_model, d_kv=16, d_ff=2 * d_model, num_layers=layers, num_heads=d_model // 16,
        relative_attention_num_buckets=8, relative_attention_max_distance=32,
    )


# The mini scale's fixed linear autoencoder (`PixelAutoencoder`): 2x2 pixels x 4 frames per latent pixel,
# the 16 (colour, temporal freq, spatial freq) components of largest variance on the embedded data set as
# training decodes it (97.6% of the variance; refitted 2026-12-03 after the session-7 data change had left two
# colour details of std 0.005 in the list, channels the DiT could only fill with noise; tests/test_wan.py).
# Normalisation: each channel's mean there (the luma DC's is -2.83: uncentred it sat at -4.4 normalised), and one
# std for all channels (their RMS std, 0.6), so the latent has unit mean variance but keeps its spectrum:
# per-channel stds (luma DC 1.9 ... details 0.13) would blow the detail channels up ~5x, and that DiT denoised
# worse (docs/bench_mini.md).
MINI_AUTOENCODER: dict[str, Any] = {
    "pixel": 2,
    "components": [(0, 0, 0), (1, 0, 0), (2, 0, 0), (0, 1, 0), (0, 0, 1), (0, 0, 2), (2, 1, 0), (0, 2, 0),
                   (1, 1, 0), (2, 2, 0), (1, 2, 0), (0, 3, 0), (2, 0, 2), (1, 0, 2), (0, 1, 1), (0, 1, 2)],
    "latents_mean": [-2.832, -0.008, -0.012] + [0.0] * 13,
    "latents_std": [0.6] * 16,
}

SCALES: dict[str, Callable[[], ScaleSpec]] = {
    "tiny": lambda: ScaleSpec(
        _small_dit(2, 16, 2, 32, 16), 16, False, _umt5(32, 1),
        dict(base_dim=8, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True]),
    ),
    # mini: width 128 (4 heads x 32), 4 layers: at 2 CPU cores, twice the steps of width 256 in the same minutes,
    # which removed more noise and gave smoother samples than the wider model (docs/bench_mini.md, issue 12)
    "mini": lambda: ScaleSpec(_small_dit(4, 32, 4, 64, 16), 64, False, _umt5(64, 2), MINI_AUTOENCODER),
    "1.3B": lambda: ScaleSpec(_wan21(12, 8960, 30), 512, True),
    "14B": lambda: ScaleSpec(_wan21(40, 13824, 40), 512, True),
}


def i2v_dit(dit: dict[str, Any]) -> dict[str, Any]:
    """The I2V variant of a T2V config: noisy + mask + condition input and the CLIP image branch."""
    inner = dit["num_attention_heads"] * dit["attention_head_dim"]
    return {**dit, "in_channels": 2 * dit["out_channels"] + 4, "image_dim": 1280, "added_kv_proj_dim": inner}


# ----------------------------------------------------------------------------------------------- autoencoders


def dct_matrix(n: int) -> Tensor:
    """Orthonormal DCT-II matrix  # [n, n], row k = frequency k."""
    i = torch.arange(n, dtype=torch.float64)
    m = torch.cos(torch.pi * (i[None] + 0.5) * i[:, None] / n) * (2.0 / n) ** 0.5
    m[0] /= 2.0**0.5
    return m.float()


def spectral_basis(temporal_factor: int, spatial_factor: int) -> Tensor:
    """Orthonormal basis of one latent pixel's block (3 colours x t frames x s x s pixels)  # [3ts², 3ts²].

    Row (c, k, j) = opponent colour c (0 luma, 1 red-blue, 2 green-magenta) x temporal DCT frequency k
    x spatial DCT frequency j (j = ky * s + kx), in `PixelAutoencoder`'s channel order (c * t + k) * s² + j.
    """
    colour = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, -1.0], [1.0, -2.0, 1.0]])
    colour = colour / colour.norm(dim=1, keepdim=True)
    space = torch.kron(dct_matrix(spatial_factor), dct_matrix(spatial_factor))
    return torch.kron(colour, torch.kron(dct_matrix(temporal_factor), space))


class PixelAutoencoder(nn.Module):
    """Fixed (no learned weights) linear autoencoder for the mini scale: what a small VAE would be.

    Like the Wan VAE, frame 0 forms the first latent frame alone and frames 1..4k form k more, 4 at a
    time; the first frame is repeated 4 times to fill its group (Wan's causal convs pad it the same way).
    Each group of 4 frames is stacked into channels and pixel-unshuffled by `spatial_factor`: 3 * 4 * s²
    values per latent pixel (48 at s=2). `components=None` keeps all of them (exactly invertible).
    Otherwise the block is rotated onto `spectral_basis` (opponent colour x temporal DCT x spatial DCT)
    and only the listed (colour, temporal freq, spatial freq) components are kept: a lossy, compact
    latent like a real VAE's. Why: a DiT token then carries 4 * C values instead of 192, so it does not
    have to carry (and learn to remove) 192 dims of noise per token through a 256-wide stream; with 48
    raw channels the mini DiT's samples stayed blocky noise (docs/bench_mini.md).
    """

    def __init__(self, spatial_factor: int = 2, temporal_factor: int = 4,
                 components: list[tuple[int, int, int]] | None = None) -> None:
        super().__init__()
        self.spatial_factor = spatial_factor
        self.temporal_factor = temporal_factor
        full = 3 * temporal_factor * spatial_factor**2
        basis = None
        if components is not None:
            t, s2 = temporal_factor, spatial_factor**2
            for c, k, j in components:
                if not (0 <= c < 3 and 0 <= k < t and 0 <= j < s2):
                    raise ValueError(f"component {(c, k, j)} out of range (3, {t}, {s2})")
            rows = [(c * t + k) * s2 + j for c, k, j in components]
            if len(set(rows)) != len(rows):
                raise ValueError("components must be distinct")
            basis = spectral_basis(temporal_factor, spatial_factor)[rows]  # [C, full]
        self.register_buffer("basis", basis, persistent=False)
        self.latent_channels = full if basis is None else basis.shape[0]

    def encode(self, video: Tensor) -> Tensor:  # [B, 3, 1+tk, H, W] -> [B, C, 1+k, H/s, W/s]
        t = self.temporal_factor
        first = video[:, :, :1].expand(-1, -1, t, -1, -1)
        groups = torch.cat([first, video[:, :, 1:]], dim=2).unflatten(2, (-1, t))  # [B, 3, n, t, H, W]
        groups = groups.permute(0, 2, 1, 3, 4, 5).flatten(2, 3)  # [B, n, 3t, H, W]
        z = F.pixel_unshuffle(groups, self.spatial_factor).transpose(1, 2)  # [B, 3ts², n, h, w]
        if self.basis is not None:
            z = torch.einsum("ck,bknhw->bcnhw", self.basis.to(z.dtype), z)  # [B, C, n, h, w]
        return z

    def decode(self, latents: Tensor) -> Tensor:  # [B, C, n, h, w] -> [B, 3, 1+t(n-1), H, W]
        if self.basis is not None:
            latents = torch.einsum("ck,bcnhw->bknhw", self.basis.to(latents.dtype), latents)  # [B, 3ts², n, h, w]
        groups = F.pixel_shuffle(latents.transpose(1, 2), self.spatial_factor)  # [B, n, 3t, H, W]
        groups = groups.unflatten(2, (3, self.temporal_factor)).permute(0, 2, 1, 3, 4, 5)  # [B, 3, n, t, H, W]
        video = torch.cat([groups[:, :, 0, :1], groups[:, :, 1:].flatten(2, 3)], dim=2)
        return video.clamp(-1.0, 1.0)


class VideoVAE(nn.Module):
    """Frozen autoencoder with Wan's latent normalisation, one interface for `AutoencoderKLWan` and
    `PixelAutoencoder`: `encode(video in [-1, 1]) -> (z - mean) / std`, `decode` inverts both steps.

    Encoding takes the posterior mode, as diffusers' Wan I2V pipeline does for its condition frames.
    """

    def __init__(self, model: nn.Module, latents_mean: list[float], latents_std: list[float]) -> None:
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        if isinstance(model, AutoencoderKLWan):
            cfg = model.config
            # `spatial_compression_ratio` is the config value, not the real factor of a custom dim_mult
            self.spatial_factor = 2 ** (len(cfg.dim_mult) - 1) * (cfg.patch_size or 1)
            self.temporal_factor = 2 ** sum(cfg.temperal_downsample)
            self.latent_channels = cfg.z_dim
        else:
            self.spatial_factor, self.temporal_factor = model.spatial_factor, model.temporal_factor
            self.latent_channels = model.latent_channels
        shape = (1, self.latent_channels, 1, 1, 1)
        self.register_buffer("latents_mean", torch.tensor(latents_mean).view(shape), persistent=False)
        self.register_buffer("latents_std", torch.tensor(latents_std).view(shape), persistent=False)

    def train(self, mode: bool = True) -> VideoVAE:
        return super().train(False)  # frozen: stays in eval mode under LightningModule.train()

    def _check_video(self, video: Tensor) -> None:
        if video.ndim != 5 or video.shape[1] != 3:
            raise ValueError(f"video must be [B, 3, F, H, W], got {tuple(video.shape)}")
        frames, h, w = video.shape[2:]
        if (frames - 1) % self.temporal_factor:
            raise ValueError(f"frame count must be 1 + {self.temporal_factor}k, got {frames}")
        if h % self.spatial_factor or w % self.spatial_factor:
            raise ValueError(f"height and width must be multiples of {self.spatial_factor}, got {h}x{w}")

    @torch.no_grad()
    def encode(self, video: Tensor) -> Tensor:  # [B, 3, 1+4k, H, W] -> [B, C, 1+k, H/s, W/s]
        self._check_video(video)
        dtype = next(self.model.parameters(), self.latents_mean).dtype
        if isinstance(self.model, AutoencoderKLWan):
            z = self.model.encode(video.to(dtype)).latent_dist.mode()
        else:
            z = self.model.encode(video.to(dtype))
        return (z - self.latents_mean.to(z.dtype)) / self.latents_std.to(z.dtype)

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:  # [B, C, f, h, w] -> [B, 3, 1+4(f-1), H, W] in [-1, 1]
        z = latents * self.latents_std.to(latents.dtype) + self.latents_mean.to(latents.dtype)
        if isinstance(self.model, AutoencoderKLWan):
            dtype = next(self.model.parameters()).dtype
            return self.model.decode(z.to(dtype)).sample
        return self.model.decode(z)


# ----------------------------------------------------------------------------------------------- text


def tokenize(tokenizer: Any, captions: list[str], text_len: int) -> tuple[Tensor, Tensor]:
    """Tokenize like `WanPipeline._get_t5_prompt_embeds`: pad/truncate to `text_len`. -> ids, mask [B, L]."""
    out = tokenizer(
        list(captions), padding="max_length", max_length=text_len, truncation=True,
        add_special_tokens=True, return_attention_mask=True, return_tensors="pt",
    )
    return out.input_ids, out.attention_mask


class TextEncoder(nn.Module):
    """Frozen umT5 encoder returning Wan's text embeddings: zero past each prompt's length."""

    def __init__(self, encoder: UMT5EncoderModel, tokenizer: Any, text_len: int) -> None:
        super().__init__()
        self.encoder = encoder.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.text_len = text_len
        self.dim = encoder.config.d_model

    def train(self, mode: bool = True) -> TextEncoder:
        return super().train(False)

    def tokenize(self, captions: list[str]) -> tuple[Tensor, Tensor]:
        return tokenize(self.tokenizer, captions, self.text_len)

    @torch.no_grad()
    def encode(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:  # [B, L] -> [B, text_len, D]
        device = next(self.encoder.parameters()).device
        input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
        emb = self.encoder(input_ids, attention_mask).last_hidden_state  # [B, L, D]
        lens = attention_mask.gt(0).sum(dim=1)  # as the pipeline: embeddings past the length become 0
        keep = torch.arange(emb.shape[1], device=device)[None, :] < lens[:, None]
        emb = torch.where(keep[..., None], emb, torch.zeros_like(emb))
        if emb.shape[1] < self.text_len:
            emb = F.pad(emb, (0, 0, 0, self.text_len - emb.shape[1]))
        return emb[:, : self.text_len]


# ----------------------------------------------------------------------------------------------- building


@dataclass
class Components:
    """Everything a Saber run needs from the model side."""

    transformer: SaberTransformer
    vae: VideoVAE
    text_encoder: TextEncoder | None  # None with data.text=precomputed: umT5 never built
    tokenizer: Any


def resolve_wan_dir(cfg: ModelConfig, subfolders: tuple[str, ...]) -> Path:
    """The local Wan diffusers folder (`wan_dir` or $WAN_DIR), checked to contain `subfolders`."""
    path = cfg.wan_dir or os.environ.get("WAN_DIR")
    if not path:
        raise ValueError(f"scale {cfg.scale!r} needs wan_dir (or $WAN_DIR): a local diffusers Wan2.1 folder")
    root = Path(path)
    missing = [s for s in subfolders if not (root / s).is_dir()]
    if missing:
        raise ValueError(f"wan_dir (or $WAN_DIR) {root} lacks subfolder(s) {missing}")
    return root


def saber_kwargs(cfg: ModelConfig) -> dict[str, Any]:
    """The SaberTransformer knobs of a ModelConfig."""
    return dict(
        ref_timestep=cfg.ref_timestep, attn_backend=cfg.attn_backend, ref_attn_mask=cfg.ref_attn_mask,
        valid_threshold=cfg.valid_threshold, mask_threshold=cfg.mask_threshold,
        ref_rope_offset=cfg.ref_rope_offset, max_refs=cfg.max_refs,
        prediction=cfg.prediction, prediction_t_min=cfg.prediction_t_min,
        position_embedding=cfg.position_embedding,
    )


def random_wan(dit: dict[str, Any], init: str, weights: str = "default") -> WanTransformer3DModel:
    """A random Wan DiT: T2V layout for init=t2v (widened later, new channels at zero), else 2C+4 inputs.

    weights: "default" = the layers' own initialisation; "adaln_zero" = `adaln_zero_` (DiT's recipe).
    """
    wan = WanTransformer3DModel(**(dit if init == "t2v" else {**dit, "in_channels": 2 * dit["out_channels"] + 4}))
    if weights == "adaln_zero":
        adaln_zero_(wan)
    elif weights != "default":
        raise ValueError(f"random weights must be 'default' or 'adaln_zero', got {weights!r}")
    return wan


@torch.no_grad()
def adaln_zero_(wan: WanTransformer3DModel) -> WanTransformer3DModel:
    """DiT's initialisation of a from-scratch model (Peebles & Xie 2023, "adaLN-Zero"), in place.

    Xavier-uniform linear layers with zero biases, N(0, 0.02) timestep MLP, and zeros wherever a
    block writes into the residual stream: the modulation (`scale_shift_table`s and `time_proj`, so
    every gate starts at 0), the cross-attention output (Wan has no gate there) and `proj_out`. Each
    block starts as the identity and the model predicts v = 0, which DiT found trains markedly faster
    than the layers' default init; pretrained scales never use it (they load Wan's weights).
    """
    for module in wan.modules():
        if isinstance(module, (nn.Linear, nn.Conv3d)):
            nn.init.xavier_uniform_(module.weight.view(module.weight.shape[0], -1))
            if module.bias is not None:
                nn.init.zeros_(module.bias)
    for linear in (wan.condition_embedder.time_embedder.linear_1, wan.condition_embedder.time_embedder.linear_2):
        nn.init.normal_(linear.weight, std=0.02)
    zeros = [wan.condition_embedder.time_proj, wan.proj_out] + [b.attn2.to_out[0] for b in wan.blocks]
    for linear in zeros:
        nn.init.zeros_(linear.weight)
        nn.init.zeros_(linear.bias)
    for table in [wan.scale_shift_table] + [b.scale_shift_table for b in wan.blocks]:
        nn.init.zeros_(table)
    return wan


def meta_wan(scale: str, i2v: bool = False, in_channels: int | None = None) -> WanTransformer3DModel:
    """The stock diffusers DiT of a scale on the meta device (no memory), for parameter counts."""
    dit = SCALES[scale]().dit
    dit = i2v_dit(dit) if i2v else {**dit, "in_channels": in_channels or dit["in_channels"]}
    with torch.device("meta"):
        return WanTransformer3DModel(**dit)


def meta_transformer(cfg: ModelConfig) -> SaberTransformer:
    """The SaberTransformer of `cfg` on the meta device (no weights read), for parameter counts.

    After `.to_empty(device=...)` and loading weights, call `rebuild_rope` before computing: the RoPE
    tables are non-persistent buffers, so no state dict restores them.
    """
    with torch.device("meta"):
        return SaberTransformer(random_wan(cfg.spec.dit, cfg.init), **saber_kwargs(cfg))


def rebuild_rope(model: SaberTransformer) -> SaberTransformer:
    """Recompute the DiT's RoPE tables in place (they are left uninitialised by `to_empty`)."""
    rope = model.wan.rope
    with torch.device(model.wan.patch_embedding.weight.device):
        model.wan.rope = WanRotaryPosEmbed(rope.attention_head_dim, rope.patch_size, rope.max_seq_len)
    return model


def num_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _cast(module: nn.Module, dtype: torch.dtype) -> nn.Module:
    """`module.to(dtype)` only when needed (diffusers warns on any `.to(dtype)` of a Wan DiT)."""
    return module if next(module.parameters()).dtype == dtype else module.to(dtype)


def check_init(cfg: ModelConfig, config: Any, folder: Path) -> None:
    """The folder's DiT must fit `cfg.init`: T2V has C input channels, I2V 2C+4."""
    want = config["out_channels"] if cfg.init == "t2v" else 2 * config["out_channels"] + 4
    if config["in_channels"] != want:
        raise ValueError(f"init={cfg.init!r} expects a transformer with {want} input channels, "
                         f"{folder} has {config['in_channels']}")


def dit_folder(cfg: ModelConfig) -> Path | None:
    """`wan_dir/transformer` when the DiT's weights come from a Wan folder, else None (random weights).

    At 1.3B/14B (init t2v/i2v) from `wan_dir` or $WAN_DIR; at tiny/mini only when `wan_dir` is set
    explicitly (the VAE and umT5 stay the scale's own seeded ones there).
    """
    if cfg.init == "random" or not (cfg.spec.pretrained or cfg.wan_dir):
        return None
    return resolve_wan_dir(cfg, ("transformer",)) / "transformer"


def _load_wan(cfg: ModelConfig, root: Path, dtype: torch.dtype) -> WanTransformer3DModel:
    """The whole DiT of `root/transformer` in one process (single-process and DDP runs)."""
    if not is_accelerate_available():  # diffusers otherwise fails with a cryptic low_cpu_mem_usage error
        raise ImportError("loading a Wan DiT with diffusers' from_pretrained needs `accelerate` (pip install accelerate)")
    wan = WanTransformer3DModel.from_pretrained(root / "transformer", torch_dtype=dtype, local_files_only=True)
    check_init(cfg, wan.config, root / "transformer")
    return wan


def _pretrained_wan(cfg: ModelConfig, root: Path, dtype: torch.dtype) -> WanTransformer3DModel:
    """A real scale's Wan DiT, whole: from `root/transformer`, or seeded random weights with init=random."""
    if cfg.init != "random":
        return _load_wan(cfg, root, dtype)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        return _cast(random_wan(cfg.spec.dit, cfg.init, cfg.random_weights), dtype)


def saber_dit(cfg: ModelConfig, wan: WanTransformer3DModel) -> SaberTransformer:
    """`wan` in Saber's layout (widened / image branch dropped) with `cfg`'s knobs."""
    transformer = SaberTransformer(wan, **saber_kwargs(cfg))
    transformer.gradient_checkpointing = cfg.gradient_checkpointing
    return transformer


def pretrained_dit(cfg: ModelConfig, dtype: torch.dtype = torch.float32) -> SaberTransformer:
    """`build_components(cfg).transformer` of a real scale without loading the VAE and umT5."""
    needed = ("transformer",) if cfg.init != "random" else ()
    return saber_dit(cfg, _pretrained_wan(cfg, resolve_wan_dir(cfg, needed), dtype))


def load_tokenizer(root: Path) -> Any:
    return AutoTokenizer.from_pretrained(root / "tokenizer", local_files_only=True)


def load_pretrained_frozen(root: Path, text_len: int, dtype: torch.dtype, device: str | torch.device = "cpu",
                           vae_dtype: torch.dtype = torch.float32, tokenizer: Any = None,
                           text_encoder: bool = True) -> tuple[VideoVAE, TextEncoder | None]:
    """The frozen Wan VAE (`vae_dtype`) and umT5 encoder (`dtype`) + tokenizer of a local Wan2.1 folder,
    loaded straight onto `device` in their dtype (no float32 CPU copy first: umT5-xxl is 23 GB in fp32).
    `text_encoder=False` (data.text=precomputed) never reads umT5: the encoder is None."""
    device_map = {"": str(torch.device(device))}
    vae_model = AutoencoderKLWan.from_pretrained(root / "vae", torch_dtype=vae_dtype, device_map=device_map,
                                                 local_files_only=True)
    vae = VideoVAE(vae_model, vae_model.config.latents_mean, vae_model.config.latents_std)
    if not text_encoder:
        return vae.to(device), None
    encoder = UMT5EncoderModel.from_pretrained(root / "text_encoder", dtype=dtype, device_map=device_map,
                                               local_files_only=True)
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(root)
    return vae.to(device), TextEncoder(encoder, tokenizer, text_len)


def random_tokenizer(cfg: ModelConfig) -> Any:
    """The tokenizer of a random umT5 (tiny/mini): bytes (ByT5) or hashed words (`model.tokenizer`)."""
    return WordHashTokenizer(WORD_VOCAB) if cfg.tokenizer == "words" else ByT5Tokenizer()


def umt5_config(cfg: ModelConfig) -> dict[str, Any]:
    """The scale's random UMT5Config kwargs, with a vocabulary that covers `model.tokenizer`'s ids."""
    return {**cfg.spec.umt5, "vocab_size": WORD_VOCAB} if cfg.tokenizer == "words" else dict(cfg.spec.umt5)


def build_components(cfg: ModelConfig, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                     text_encoder: bool = True) -> Components:
    """Build (tiny/mini) or load (1.3B/14B from wan_dir) the DiT, VAE, text encoder and tokenizer.

    Every component is whole in this process: FSDP2 runs load the DiT in slices instead (loading.py).
    `text_encoder=False` (data.text=precomputed) never builds or reads umT5 nor its tokenizer (both None).
    """
    spec = cfg.spec
    text_len = cfg.resolved_text_len
    if spec.pretrained:
        needed = ("vae",) + (("text_encoder", "tokenizer") if text_encoder else ()) + (
            ("transformer",) if cfg.init != "random" else ())
        root = resolve_wan_dir(cfg, needed)
        wan = _pretrained_wan(cfg, root, dtype)
        vae, encoded = load_pretrained_frozen(root, text_len, dtype, text_encoder=text_encoder)
        encoder, tokenizer = (encoded.encoder, encoded.tokenizer) if encoded is not None else (None, None)
    else:
        with torch.random.fork_rng(devices=[]):  # same random weights on every rank
            torch.manual_seed(cfg.seed)
            wan = random_wan(spec.dit, cfg.init, cfg.random_weights)  # built even when loaded below: umT5 draws next
            encoder = UMT5EncoderModel(UMT5Config(**umt5_config(cfg))) if text_encoder else None
        if (folder := dit_folder(cfg)) is not None:
            wan = _load_wan(cfg, folder.parent, dtype)
        if "pixel" in spec.vae:
            pixel = PixelAutoencoder(spatial_factor=spec.vae["pixel"], components=spec.vae.get("components"))
            channels = pixel.latent_channels
            vae = VideoVAE(pixel, spec.vae.get("latents_mean", [0.0] * channels),
                           spec.vae.get("latents_std", [1.0] * channels))
        else:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(cfg.seed + 1)
                vae_model = AutoencoderKLWan(**spec.vae)
            vae = VideoVAE(vae_model, vae_model.config.latents_mean, vae_model.config.latents_std)
        tokenizer = random_tokenizer(cfg) if text_encoder else None
        wan = _cast(wan, dtype)
        encoder = _cast(encoder, dtype) if encoder is not None else None
    if vae.latent_channels != wan.config.out_channels:
        raise ValueError(f"VAE has {vae.latent_channels} latent channels, DiT {wan.config.out_channels}")
    transformer = saber_dit(cfg, wan)
    text = TextEncoder(encoder, tokenizer, text_len).to(device) if encoder is not None else None
    return Components(transformer.to(device), vae.to(device), text, tokenizer)
