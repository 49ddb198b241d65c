"""SaberTransformer: diffusers' Wan2.1 DiT with masked references appended on the temporal axis.

Input (SABER.md), C latent channels (16 for the Wan VAE):

    z_in = channel_concat(temporal_concat(z_t, z_ref),      # C   noisy video, then clean references
                          temporal_concat(0,   m_ref),      # 4   reference mask (Wan I2V's 4 mask channels)
                          temporal_concat(0,   z_ref))      # C   condition: zeros on video, references

Reference k is a one-frame latent with temporal RoPE index F + ref_rope_offset + k. Reference tokens
whose patch is mostly outside the mask are dropped before the first block; the remaining tokens of all
samples are packed into one sequence and run through the unchanged diffusers blocks with
`SaberAttnProcessor` (see attention.py). Only the video tokens are decoded.

The module keeps the diffusers model as `self.wan`, so `self.wan.save_pretrained(...)` writes a normal
diffusers folder (36 input channels, no image branch).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers import WanTransformer3DModel
from diffusers.models.embeddings import get_3d_sincos_pos_embed
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from saber_pl.attention import Packing, PackedRotary, SaberAttnProcessor

MASK_CHANNELS = 4  # the Wan VAE's temporal factor, as in Wan I2V's mask input


def saber_in_channels(latent_channels: int) -> int:
    """Channels of z_in: noisy latent + mask + condition latent."""
    return 2 * latent_channels + MASK_CHANNELS


@torch.no_grad()
def widen_patch_embedding(wan: WanTransformer3DModel) -> None:
    """T2V -> Saber layout: grow the patch embedding from C to 2C+4 input channels, new weights at zero.

    With zero weights on the mask and condition channels, the model computes exactly what the T2V model
    computes on the video frames, so training starts from the T2V model.
    """
    old = wan.patch_embedding
    c = wan.config.out_channels
    new = nn.Conv3d(
        saber_in_channels(c), old.out_channels, old.kernel_size, old.stride,
        device=old.weight.device, dtype=old.weight.dtype,
    )
    if old.weight.device.type != "meta":
        new.weight.zero_()
        new.weight[:, : old.in_channels].copy_(old.weight)
        new.bias.copy_(old.bias)
    wan.patch_embedding = new
    wan.register_to_config(in_channels=saber_in_channels(c))


def drop_image_branch(wan: WanTransformer3DModel) -> None:
    """I2V -> Saber: remove the CLIP image embedder and the added k/v projections (Saber has no CLIP input)."""
    wan.condition_embedder.image_embedder = None
    for block in wan.blocks:
        attn = block.attn2
        attn.add_k_proj = attn.add_v_proj = None
        attn.added_kv_proj_dim = None
        if hasattr(attn, "norm_added_k"):
            del attn.norm_added_k
    wan.register_to_config(image_dim=None, added_kv_proj_dim=None, pos_embed_seq_len=None)


def to_saber_layout(wan: WanTransformer3DModel) -> WanTransformer3DModel:
    """Bring a T2V (C in-channels) or I2V (2C+4, image branch) Wan model into Saber's layout, in place."""
    c, cin = wan.config.out_channels, wan.config.in_channels
    if cin == c:
        widen_patch_embedding(wan)
    elif cin != saber_in_channels(c):
        raise ValueError(f"Wan in_channels must be {c} (T2V) or {saber_in_channels(c)} (I2V), got {cin}")
    if wan.config.image_dim is not None or wan.config.added_kv_proj_dim is not None:
        drop_image_branch(wan)
    return wan


class _Fp32UnderAutocast:
    """Mixin: the module's forward runs with autocast disabled, on a float32 input."""

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        if not torch.is_autocast_enabled(x.device.type):
            return super().forward(x, *args, **kwargs)
        with torch.autocast(x.device.type, enabled=False):
            return super().forward(x.float(), *args, **kwargs)


_FP32_CLASSES: dict[type, type] = {}


def keep_fp32_under_autocast(module: nn.Module) -> nn.Module:
    """Make `module` compute in float32 under autocast (in place, by a class swap; returns it).

    diffusers keeps the Wan time embedder in float32 when it loads the DiT in bf16; under autocast
    (DDP + ``bf16-mixed``) its linears would otherwise run in bf16. A class swap rather than an
    instance `forward` keeps deep copies (the EMA) bound to their own weights.
    """
    cls = type(module)
    if issubclass(cls, _Fp32UnderAutocast):
        return module
    if cls not in _FP32_CLASSES:
        _FP32_CLASSES[cls] = type(f"Fp32{cls.__name__}", (_Fp32UnderAutocast, cls), {})
    module.__class__ = _FP32_CLASSES[cls]
    return module


class SaberTransformer(nn.Module):
    """Saber's reference-conditioned DiT around a diffusers `WanTransformer3DModel` (see module docstring)."""

    def __init__(
        self,
        wan: WanTransformer3DModel,
        *,
        ref_timestep: str = "shared",
        attn_backend: str = "auto",
        ref_attn_mask: bool = True,
        valid_threshold: float = 0.5,
        mask_threshold: float = 0.5,
        ref_rope_offset: int = 0,
        max_refs: int = 8,
        prediction: str = "velocity",
        prediction_t_min: float = 0.05,
        position_embedding: str = "none",
    ) -> None:
        super().__init__()
        if position_embedding not in ("none", "sincos"):
            raise ValueError(f"position_embedding must be 'none' or 'sincos', got {position_embedding!r}")
        if prediction not in ("velocity", "sample"):
            raise ValueError(f"prediction must be 'velocity' or 'sample', got {prediction!r}")
        if ref_timestep not in ("shared", "zero"):
            raise ValueError(f"ref_timestep must be 'shared' or 'zero', got {ref_timestep!r}")
        if tuple(wan.config.patch_size)[0] != 1:
            raise ValueError(f"references are single latent frames: patch_size[0] must be 1, got {wan.config.patch_size}")
        self.wan = to_saber_layout(wan)
        self.ref_timestep = ref_timestep
        self.ref_attn_mask = ref_attn_mask
        self.valid_threshold = valid_threshold
        self.mask_threshold = mask_threshold
        self.ref_rope_offset = ref_rope_offset
        self.max_refs = max_refs
        self.prediction = prediction
        self.prediction_t_min = prediction_t_min
        self.position_embedding = position_embedding
        self.gradient_checkpointing = False
        # Dtype the blocks compute in. None: the patch embedding's dtype (a plain or `cast_like_pretrained`
        # model); set by parallel.shard_transformer, where parameters read between FSDP2 units are shards.
        self.compute_dtype: torch.dtype | None = None
        keep_fp32_under_autocast(self.wan.condition_embedder.time_embedder)
        self.processor = SaberAttnProcessor(attn_backend)
        for block in self.wan.blocks:
            block.attn1.set_processor(self.processor)
            block.attn2.set_processor(self.processor)

    @property
    def latent_channels(self) -> int:
        return self.wan.config.out_channels

    def _check_inputs(
        self, latents: Tensor, timestep: Tensor, text_emb: Tensor, ref_latents: Tensor | None,
        ref_coverage: Tensor | None, ref_counts: Tensor | None,
    ) -> tuple[Tensor | None, Tensor | None, int]:
        """Validate shapes; return (coverage, counts, Kmax) with defaults filled in."""
        b, c, f, h, w = latents.shape
        _, ph, pw = self.wan.config.patch_size
        if c != self.latent_channels or h % ph or w % pw:
            raise ValueError(f"latents must be [B, {self.latent_channels}, F, h, w] with h, w divisible by {ph, pw}")
        if timestep.shape != (b,):
            raise ValueError(f"timestep must have shape [B]={b}, got {tuple(timestep.shape)}")
        if text_emb.ndim != 3 or text_emb.shape[0] != b or text_emb.shape[2] != self.wan.config.text_dim:
            raise ValueError(f"text_emb must be [B, L, {self.wan.config.text_dim}], got {tuple(text_emb.shape)}")
        if ref_latents is None:
            return None, None, 0
        k = ref_latents.shape[1]
        if ref_latents.shape != (b, k, c, h, w):
            raise ValueError(f"ref_latents must be [B, K, {c}, {h}, {w}], got {tuple(ref_latents.shape)}")
        if k > self.max_refs:
            raise ValueError(f"{k} references exceed max_refs={self.max_refs}")
        if f + self.ref_rope_offset + k > self.wan.rope.max_seq_len:
            raise ValueError(f"F + ref_rope_offset + K = {f + self.ref_rope_offset + k} exceeds the RoPE table")
        if ref_coverage is None:  # whole-image references (e.g. a background scene)
            ref_coverage = ref_latents.new_ones(b, k, 1, h, w)
        if ref_coverage.shape != (b, k, 1, h, w):
            raise ValueError(f"ref_coverage must be [B, K, 1, {h}, {w}], got {tuple(ref_coverage.shape)}")
        if ref_counts is None:
            ref_counts = torch.full((b,), k, device=latents.device, dtype=torch.long)
        if ref_counts.shape != (b,) or bool((ref_counts < 0).any() | (ref_counts > k).any()):
            raise ValueError(f"ref_counts must be [B] with values in [0, {k}]")
        return ref_coverage, ref_counts.to(latents.device), k

    def _rope_table(self, frames: int, k: int, hp: int, wp: int) -> tuple[Tensor, Tensor]:
        """RoPE cos/sin [T*hp*wp, head_dim] for one sample: video frames 0..F-1, reference j at F+offset+j.

        Built from `WanRotaryPosEmbed`'s tables, which only know positions 0..T-1 of a dense grid.
        """
        rope = self.wan.rope
        t_idx = torch.cat([torch.arange(frames), frames + self.ref_rope_offset + torch.arange(k)])
        t_idx = t_idx.to(rope.freqs_cos.device)
        tables = []
        for freqs in (rope.freqs_cos, rope.freqs_sin):
            ft, fh, fw = freqs.split([rope.t_dim, rope.h_dim, rope.w_dim], dim=1)
            n = len(t_idx)
            grid = torch.cat(
                [
                    ft[t_idx].view(n, 1, 1, -1).expand(n, hp, wp, -1),
                    fh[:hp].view(1, hp, 1, -1).expand(n, hp, wp, -1),
                    fw[:wp].view(1, 1, wp, -1).expand(n, hp, wp, -1),
                ],
                dim=-1,
            )
            tables.append(grid.reshape(n * hp * wp, -1))
        return tables[0], tables[1]

    def video_positions(self, frames: int, hp: int, wp: int) -> Tensor:  # [F*hp*wp, D]
        """Fixed 3D sin-cos embedding of each video token's absolute (frame, row, column), added after
        the patch embedding (`position_embedding: sincos`; CogVideoX's table, as DiT adds its 2D one).

        Why: Wan's only positions are RoPE's, which are relative, so a DiT fed pure noise is translation
        equivariant and its best guess at t ~ 1 is the same at every token. Where the data ties the layout
        to the caption (mini: a subject that slides through the frame's centre), the mean clip of "slides
        to the left" cannot be drawn without absolute positions, and the direction word is worth nothing
        where the sampler lays the clip out (docs/bench_mini.md, sixth round). Reference tokens get none:
        they are told apart by their mask channels and RoPE index. Off for pretrained Wan (no such input).
        """
        dim = self.wan.config.num_attention_heads * self.wan.config.attention_head_dim
        table = get_3d_sincos_pos_embed(dim, (wp, hp), frames, device=self.wan.patch_embedding.weight.device)
        return table.flatten(0, 1)  # [F, hp*wp, D] -> [F*hp*wp, D], in the tokens' (f, h, w) order

    def forward(
        self,
        latents: Tensor,  # [B, C, F, h, w] noisy video latents z_t
        timestep: Tensor,  # [B] in [0, 1000]
        text_emb: Tensor,  # [B, L, D_text], zero-padded past each prompt
        ref_latents: Tensor | None = None,  # [B, Kmax, C, h, w] clean references (slots >= count ignored)
        ref_coverage: Tensor | None = None,  # [B, Kmax, 1, h, w] mask coverage per latent pixel in [0, 1]
        ref_counts: Tensor | None = None,  # [B] long, real references per sample
        *,
        dense_reference: bool = False,  # debug/test path: keep every token, mask invalid keys densely
    ) -> Tensor:  # [B, C, F, h, w] velocity on the video frames
        ref_coverage, ref_counts, k = self._check_inputs(
            latents, timestep, text_emb, ref_latents, ref_coverage, ref_counts
        )
        wan = self.wan
        b, c, f, h, w = latents.shape
        _, ph, pw = wan.config.patch_size
        hp, wp = h // ph, w // pw
        s_vid, s_ref = f * hp * wp, hp * wp
        s_full = s_vid + k * s_ref
        dtype = self.compute_dtype or wan.patch_embedding.weight.dtype
        z_t = latents  # as given (float32 in training): prediction=sample converts from it, not from its bf16 copy
        latents, text_emb = latents.to(dtype), text_emb.to(dtype)

        # 1. z_in and patch embedding of video + reference frames
        x = torch.cat([latents, latents.new_zeros(b, MASK_CHANNELS + c, f, h, w)], dim=1)  # [B, 2C+4, F, h, w]
        if k:
            mask = (ref_coverage >= self.mask_threshold).to(dtype).expand(-1, -1, MASK_CHANNELS, -1, -1)
            refs = ref_latents.to(dtype)
            refs = torch.cat([refs, mask, refs], dim=2).transpose(1, 2)  # [B, 2C+4, K, h, w]
            x = torch.cat([x, refs], dim=2)  # [B, 2C+4, F+K, h, w]
        tokens = wan.patch_embedding(x).flatten(2).transpose(1, 2).contiguous()  # [B, S_full, D]
        if self.position_embedding == "sincos":
            tokens[:, :s_vid] += self.video_positions(f, hp, wp).to(tokens)

        # 2. token validity: video always, references inside the mask (or all real ones without the mask)
        valid = torch.ones(b, s_full, dtype=torch.bool, device=tokens.device)
        if k:
            real = torch.arange(k, device=tokens.device)[None, :] < ref_counts[:, None]  # [B, K]
            ref_valid = real[:, :, None].expand(b, k, s_ref)
            if self.ref_attn_mask:
                cov = F.avg_pool2d(ref_coverage.flatten(0, 1).float(), (ph, pw)).view(b, k, s_ref)
                ref_valid = ref_valid & (cov >= self.valid_threshold)
            valid[:, s_vid:] = ref_valid.flatten(1)

        # 3. pack the kept tokens of all samples into one sequence [1, N, D]
        keep = torch.ones_like(valid) if dense_reference else valid
        idx = keep.flatten().nonzero().squeeze(1)  # [N]
        sample, pos = idx // s_full, idx % s_full
        packing = Packing(keep.sum(1).tolist(), valid.flatten() if dense_reference else None)
        hidden = tokens.flatten(0, 1)[idx].unsqueeze(0)  # [1, N, D]
        cos, sin = self._rope_table(f, k, hp, wp)
        rope = PackedRotary(cos[pos].unsqueeze(0).unsqueeze(2), sin[pos].unsqueeze(0).unsqueeze(2), packing)

        # 4. timestep modulation: per sample, or per token when samples or token timesteps differ
        zero_refs = self.ref_timestep == "zero" and k > 0
        ts = torch.cat([timestep, torch.zeros_like(timestep)]) if zero_refs else timestep
        temb, tproj, text, _ = wan.condition_embedder(ts, text_emb)  # [B(2B), D], [B(2B), 6D], [B, L, D]
        tproj = tproj.unflatten(1, (6, -1))  # [B(2B), 6, D]
        if b == 1 and not zero_refs:
            block_temb = tproj  # [1, 6, D]: diffusers' broadcast path
        else:
            rows = torch.where(pos >= s_vid, sample + b, sample) if zero_refs else sample
            block_temb = tproj[rows].unsqueeze(0)  # [1, N, 6, D]: diffusers' per-token path

        # 5. diffusers' blocks on the packed sequence
        for block in wan.blocks:
            if torch.is_grad_enabled() and self.gradient_checkpointing:
                hidden = checkpoint(block, hidden, text, block_temb, rope, use_reentrant=False)
            else:
                hidden = block(hidden, text, block_temb, rope)

        # 6. unpack the video tokens; output norm, projection and unpatchify as in diffusers
        starts = torch.tensor(packing.offsets[:-1], device=hidden.device)
        vid_idx = (starts[:, None] + torch.arange(s_vid, device=hidden.device)[None, :]).flatten()
        hidden = hidden[0, vid_idx].view(b, s_vid, -1)  # [B, S_vid, D]
        shift, scale = (wan.scale_shift_table.to(temb.device) + temb[:b].unsqueeze(1)).chunk(2, dim=1)
        hidden = (wan.norm_out(hidden.float()) * (1 + scale) + shift).type_as(hidden)
        hidden = wan.proj_out(hidden)  # [B, S_vid, C*ph*pw]
        hidden = hidden.reshape(b, f, hp, wp, 1, ph, pw, -1).permute(0, 7, 1, 4, 2, 5, 3, 6)
        out = hidden.flatten(6, 7).flatten(4, 5).flatten(2, 3)  # [B, C, F, h, w]
        return self.velocity_from_output(out, z_t, timestep)

    def velocity_from_output(self, out: Tensor, latents: Tensor, timestep: Tensor) -> Tensor:
        """The head's output as a velocity  # [B, C, F, h, w].

        prediction=velocity: the output itself (Wan). prediction=sample: the output is the clean latent
        z0 and v = (z_t - z0) / max(t, t_min), since z_t = (1 - t) z0 + t eps gives eps - z0 = (z_t - z0) / t.
        Why (JiT, Li & He 2025): a small DiT whose tokens carry many noise dimensions (here 64 per token at
        width 128) must pass the noise through exactly to predict eps - z0, and any error there stays in
        the sample as per-token colour noise; the clean latent is low-dimensional and easier to output.
        """
        if self.prediction == "velocity":
            return out
        t = (timestep.float() / 1000.0).clamp(min=self.prediction_t_min).view(-1, 1, 1, 1, 1)
        return ((latents.float() - out.float()) / t).to(out.dtype)
