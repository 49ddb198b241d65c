"""Will it fit? Memory per rank, FLOPs per step and step time of a resolved config, before renting GPUs.

    make plan EXP=saber_full SCALE=14B GPUS=64 GPU_MEM=80
    python -m saber_pl.plan --exp saber_full --scale 14B --gpus 8 --gpu-mem 80 [--mfu 0.35] [--peak-tflops 989] \\
        [--json] [key.sub=value ...]

Everything comes from the resolved config (`config.load_config`) and from models built on the meta device
(no memory, no weights): the DiT's exact parameters (`wan.meta_transformer`), and the frozen umT5 and VAE,
whose encode peaks and FLOPs are measured by running them on meta tensors (`LiveBytes`, torch's
`FlopCounterMode`). The DiT's activations are an op-by-op count of what autograd saves in diffusers'
`WanTransformerBlock` (`block_saved`), checked against a CPU measurement in tests/test_plan.py. The
verdict says whether the peak fits in the GPU memory less a headroom, and if not, which knobs make it
fit (each one re-planned). docs/plan.md states every assumption.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import sys
import weakref
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import FlopCounterMode

from saber_pl.config import ConfigError, ExperimentConfig, load_config
from saber_pl.wan import ModelConfig, meta_transformer

GiB = 2**30
FP32 = 4
# Wan2.1's text_encoder/config.json (umT5-xxl encoder: 5,680,910,336 parameters); its VAE is diffusers'
# default AutoencoderKLWan config (126,892,531 parameters).
UMT5_XXL = dict(vocab_size=256384, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
                relative_attention_num_buckets=32, relative_attention_max_distance=128,
                feed_forward_proj="gated-gelu", tie_word_embeddings=False)


# ----------------------------------------------------------------------------------------------- measuring


class LiveBytes(TorchDispatchMode):
    """Peak bytes of the tensor storages created inside the mode (CPU, CUDA or meta tensors).

    Every op output whose storage is new (not one of the op's inputs' storages, not seen before) is counted
    until Python frees it; views and in-place ops add nothing. Tensors made before entering are not counted.
    """

    def __init__(self) -> None:
        super().__init__()
        self._seen: weakref.WeakSet = weakref.WeakSet()
        self.now = 0
        self.peak = 0

    def _free(self, n: int) -> None:
        self.now -= n

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        inputs = [t.untyped_storage() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        ids = {id(s) for s in inputs}
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                st = t.untyped_storage()
                if id(st) not in ids and st not in self._seen:
                    self._seen.add(st)
                    n = st.nbytes()
                    weakref.finalize(st, self._free, n)
                    self.now += n
                    self.peak = max(self.peak, self.now)
        return out


# ----------------------------------------------------------------------------------------------- the models


@dataclass(frozen=True)
class DitShape:
    """What the plan needs of the DiT, read from the meta-device SaberTransformer."""

    shapes: tuple[tuple[str, tuple[int, ...]], ...]  # every parameter: (name, shape)
    layers: int
    dim: int  # heads x head_dim
    ffn: int
    head_dim: int
    in_channels: int  # of the patch embedding (2C + 4)
    patch_volume: int  # latent pixels per patch (1 x 2 x 2)
    block_params: int  # one transformer block
    block_fp32_params: int  # of which diffusers keeps float32 under bf16 (norm2, scale_shift_table)
    matmul: tuple[tuple[str, int], ...]  # (token role, weight elements) of every Linear / Conv3d

    @property
    def params(self) -> int:
        return sum(math.prod(s) for _, s in self.shapes)


def _role(name: str) -> str:
    """Which tokens a DiT linear layer sees (see `dit_flops`)."""
    if name.startswith("wan.blocks."):
        return "block text" if ".attn2.to_k" in name or ".attn2.to_v" in name else "block"
    if name.startswith("wan.patch_embedding"):
        return "patches"
    if name.startswith("wan.condition_embedder.text_embedder"):
        return "text"
    if name.startswith("wan.proj_out"):
        return "video"
    return "time"  # time embedder and time projection: one row per clip


def dit_shape(model: ModelConfig) -> DitShape:
    """The DiT of `model`, built on the meta device (its parameters depend on the scale and the init only)."""
    return _dit_shape(model.scale, model.init)


@functools.lru_cache(maxsize=8)
def _dit_shape(scale: str, init: str) -> DitShape:
    return shape_of(meta_transformer(ModelConfig(scale=scale, init=init)))


def shape_of(dit: nn.Module) -> DitShape:
    """A SaberTransformer's structure (any device)."""
    wan = dit.wan
    cfg = wan.config
    keep = set(getattr(wan, "_keep_in_fp32_modules", None) or [])
    block = wan.blocks[0]
    matmul = tuple((_role(n), m.weight.numel()) for n, m in dit.named_modules()
                   if isinstance(m, (nn.Linear, nn.Conv3d)))
    return DitShape(
        shapes=tuple((n, tuple(p.shape)) for n, p in dit.named_parameters()),
        layers=cfg.num_layers, dim=cfg.num_attention_heads * cfg.attention_head_dim, ffn=cfg.ffn_dim,
        head_dim=cfg.attention_head_dim, in_channels=cfg.in_channels, patch_volume=math.prod(cfg.patch_size),
        block_params=sum(p.numel() for p in block.parameters()),
        block_fp32_params=sum(p.numel() for n, p in block.named_parameters() if n.split(".")[0] in keep),
        matmul=matmul)


def _frozen_modules(scale: str) -> tuple[nn.Module, nn.Module]:
    """The frozen umT5 encoder and VideoVAE of a scale, on the meta device."""
    from diffusers import AutoencoderKLWan
    from transformers import UMT5Config, UMT5EncoderModel

    from saber_pl.wan import SCALES, PixelAutoencoder, VideoVAE

    spec = SCALES[scale]()
    with torch.device("meta"):
        encoder = UMT5EncoderModel(UMT5Config(**(UMT5_XXL if spec.pretrained else spec.umt5)))
        if "pixel" in spec.vae:
            ae = PixelAutoencoder(spec.vae["pixel"], components=spec.vae.get("components"))
            vae = VideoVAE(ae, [0.0] * ae.latent_channels, [1.0] * ae.latent_channels)
        else:
            ae = AutoencoderKLWan(**({} if spec.pretrained else spec.vae))
            vae = VideoVAE(ae, ae.config.latents_mean, ae.config.latents_std)
    return encoder.eval(), vae


@dataclass(frozen=True)
class FrozenCost:
    umt5_params: int
    vae_params: int
    spatial: int  # VAE factors
    temporal: int
    video_peak: int  # bytes alive at the peak of one micro-batch's video encode
    refs_peak: int  # ... of its K reference frames (one-frame videos)
    text_peak: int  # ... of its umT5 encode
    video_flops: int  # forward FLOPs of the clip encode
    refs_flops: int  # ... of the K reference encodes
    text_flops: int  # ... of the umT5 encode


@functools.lru_cache(maxsize=64)
def frozen_cost(scale: str, batch: int, frames: int, height: int, width: int, refs: int,
                text_len: int, nbytes: int) -> FrozenCost:
    """Measure the frozen encoders of one micro-batch on the meta device (shapes only: seconds, no memory).

    The text encoder runs without its padding mask (transformers' mask builder needs data); same cost.
    """
    dtype = torch.bfloat16 if nbytes == 2 else torch.float32
    encoder, vae = _frozen_modules(scale)
    encoder, vae = encoder.to(dtype), vae.to(dtype)
    peaks, flops = [], []
    clip = functools.partial(torch.empty, device="meta", dtype=dtype)
    runs = [lambda: vae.encode(clip(batch, 3, frames, height, width)),
            lambda: vae.encode(clip(batch * refs, 3, 1, height, width)) if refs else None,
            lambda: encoder(torch.zeros(batch, text_len, dtype=torch.long, device="meta"))]
    for run in runs:
        live = LiveBytes()
        with torch.no_grad(), live, FlopCounterMode(display=False) as counter:
            run()
        peaks.append(live.peak)
        flops.append(counter.get_total_flops())
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    return FrozenCost(count(encoder), count(vae), vae.spatial_factor, vae.temporal_factor, *peaks, *flops)


# ----------------------------------------------------------------------------------------------- tokens


@dataclass(frozen=True)
class Tokens:
    """Tokens of one micro-batch on one rank (equal clips)."""

    batch: int
    video: int  # video tokens per clip: latent frames x patches per frame
    refs: float  # valid reference tokens per clip
    refs_k: float  # references per clip
    frame_patches: int  # patches per latent frame (1,560 at 480x832)
    text: int  # text tokens per clip
    per_token: bool  # diffusers' per-token modulation path ([1, N, 6, D] fp32 per block)
    time_rows: int = 1  # timestep rows per clip (2 with ref_timestep: zero)

    @property
    def clip(self) -> float:
        return self.video + self.refs

    @property
    def packed(self) -> float:  # N: the packed sequence of the micro-batch
        return self.batch * self.clip


def tokens(cfg: ExperimentConfig, spatial: int, temporal: int, worst: bool) -> Tokens:
    """Worst case (memory: K = refs_max references, every token valid) or expected (time: E[K] for K uniform
    in [refs_min, refs_max], E[coverage] = the mean foreground ratio of the mask bins, before augmentation)."""
    d, m = cfg.data, cfg.masks
    _, ph, pw = cfg.model.spec.dit["patch_size"]
    frame = (d.height // spatial // ph) * (d.width // spatial // pw)
    video = (1 + (d.num_frames - 1) // temporal) * frame
    k = float(d.refs_max) if worst else (d.refs_min + d.refs_max) / 2 if d.refs_max else 0.0
    if worst or not cfg.model.ref_attn_mask:
        coverage = 1.0
    elif m.fixed_ratio is not None:
        coverage = m.fixed_ratio
    else:
        coverage = sum(p * (lo + hi) / 2 for lo, hi, p in m.ratio_bins) / sum(p for *_, p in m.ratio_bins)
    zero = cfg.model.ref_timestep == "zero" and d.refs_max > 0
    return Tokens(d.batch_size, video, k * frame * coverage, k, frame, cfg.model.resolved_text_len,
                  d.batch_size > 1 or zero, 2 if zero else 1)


# ----------------------------------------------------------------------------------------------- memory


def shard_bytes(shapes: tuple[tuple[str, tuple[int, ...]], ...], world: int, nbytes: int) -> tuple[int, int]:
    """(total, largest rank) bytes of `shapes` sharded as FSDP2 does, on dim 0: rank 0 holds ceil(d0 / world) rows."""
    total = sum(math.prod(s) for _, s in shapes) * nbytes
    rank0 = sum(min(-(-s[0] // world), s[0]) * math.prod(s[1:]) if s else 1 for _, s in shapes) * nbytes
    return total, rank0


def block_saved(dit: DitShape, tok: Tokens, c: int, kernels: str, attn_backend: str) -> float:
    """Bytes autograd saves in one WanTransformerBlock forward on the packed micro-batch (`c`: compute dtype bytes).

    Counted op by op from diffusers' block (norms and modulation in fp32, linears in the compute dtype):
    fp32: the inputs of norm1/norm2/norm3, the outputs of norm1/norm3 (multiplied by 1 + scale) and the FFN
    output (multiplied by the gate); compute dtype: the input of q/k/v, RoPE'd q and k, v, the attention
    output and its projection (multiplied by the gate), the cross-attention input, normed query and output,
    the FFN input, its hidden (gelu input) and gelu output (2 x N x ffn). RMSNorm: the fused CUDA kernel saves
    its input; the CPU composite an fp32 copy and x * rsqrt. SDPA per packed sample (backend `sdpa`, or CPU)
    also keeps each sample's output before the concat. Per-token modulation adds 1 + scale (x2) and the
    [N, 6, D] fp32 sum of scale_shift_table and temb.
    """
    nd = tok.packed * dit.dim
    text = tok.batch * tok.text * dit.dim
    rms = c if kernels == "cuda" else 2 * FP32
    saved = 6 * FP32 * nd + 10 * c * nd + 2 * c * tok.packed * dit.ffn + 3 * rms * nd + (rms + 2 * c) * text
    if kernels != "cuda" or attn_backend == "sdpa":
        saved += 2 * c * nd
    if tok.per_token:
        saved += 8 * FP32 * nd
    return saved


def dit_activations(dit: DitShape, tok: Tokens, c: int, checkpointing: bool, kernels: str = "cuda",
                    attn_backend: str = "auto") -> dict[str, float]:
    """Peak activation bytes of one DiT forward + backward, by term (bytes; 'total' is their sum).

    With per-block checkpointing the peak is at the first block's backward: every block's saved input,
    one block recomputed, and the gradients being formed. Without it, at the end of the forward: every
    block's saved tensors.
    """
    n, d = tok.packed, dit.dim
    nd = n * d
    block = block_saved(dit, tok, c, kernels, attn_backend)
    shared = tok.batch * tok.text * d * c + 2 * n * dit.head_dim * FP32  # text embedding, RoPE cos / sin
    shared += 6 * nd * c if tok.per_token else 0  # the per-token temb [1, N, 6, D]
    head = tok.batch * tok.video * d * (2 * FP32 + c)  # norm_out input and output in fp32, proj_out input
    # backward working set: grads of the block output and of the residual in fp32, of the FFN hidden x2
    work = c * nd + 2 * FP32 * nd + 2 * c * n * dit.ffn
    if checkpointing:
        inputs = dit.layers * c * nd
        recompute = block - (FP32 * nd if c == FP32 else 0)  # in fp32 norm1 reads the checkpointed input itself
        terms = {"block inputs": inputs, "one block recomputed": recompute, "backward working set": work}
    else:
        patches = tok.batch * (tok.video + tok.refs_k * tok.frame_patches)  # before dropping reference tokens
        embed = patches * c * (d + dit.in_channels * dit.patch_volume)  # z_in and patch tokens, alive to the end
        terms = {"saved by every block": dit.layers * block, "output head": head, "patch embedding": embed}
    terms["text, RoPE, temb"] = shared
    terms["total"] = sum(terms.values())
    return terms


def gathered_bytes(dit: DitShape, c: int) -> float:
    """FSDP2 all-gathered blocks in flight: current + prefetched, params and unsharded grads in the compute
    dtype (the fp32-kept norm2 / scale_shift_table in fp32), plus one block's grads cast to fp32 for the
    reduce-scatter."""
    low = dit.block_params - dit.block_fp32_params
    per_block = low * c + dit.block_fp32_params * FP32
    return 2 * 2 * per_block + dit.block_params * FP32


# ----------------------------------------------------------------------------------------------- the plan


@dataclass
class Plan:
    """Everything `make plan` prints (memory in GiB per rank, FLOPs per optimizer step); `--json` dumps it."""

    exp: str
    scale: str
    world: int
    gpu_mem_gib: float
    usable_gib: float
    batch: int
    accumulation: int
    global_batch: int
    tokens: dict[str, float]
    params: dict[str, int]
    state: dict[str, tuple[int, int]]  # name -> (total bytes, largest rank bytes)
    memory_gib: dict[str, float]  # per rank
    activations_gib: dict[str, float]  # the DiT activations by term
    phases_gib: dict[str, float]
    peak_gib: float
    fits: bool
    flops: dict[str, float]
    step_time_s: float
    mfu: float
    peak_tflops: float
    generation_gib: dict[str, float] = field(default_factory=dict)  # one GPU, generate.py
    assumptions: list[str] = field(default_factory=list)
    knobs: list[dict[str, Any]] = field(default_factory=list)
    overrides: list[str] = field(default_factory=list)


def precision_bytes(cfg: ExperimentConfig) -> tuple[int, int]:
    """(master, compute) bytes per element: fp32 masters unless bf16-true, bf16 compute under bf16-*
    (``auto`` is bf16-mixed on a GPU)."""
    p = cfg.trainer.precision
    if p == "auto":
        p = "32-true" if cfg.trainer.accelerator == "cpu" else "bf16-mixed"
    return (2 if p == "bf16-true" else FP32), (2 if p.startswith("bf16") else FP32)


@functools.lru_cache(maxsize=16)
def vae_decode_peak(scale: str, frames: int, height: int, width: int, nbytes: int) -> int:
    """Bytes alive at the peak of decoding one generated video (measured on the meta device)."""
    dtype = torch.bfloat16 if nbytes == 2 else torch.float32
    _, vae = _frozen_modules(scale)
    vae = vae.to(dtype)
    latent = (1, vae.latent_channels, 1 + (frames - 1) // vae.temporal_factor, height // vae.spatial_factor,
              width // vae.spatial_factor)
    live = LiveBytes()
    with torch.no_grad(), live:
        vae.decode(torch.empty(latent, device="meta", dtype=dtype))
    return live.peak


def dit_inference_peak(dit: DitShape, tok: Tokens, c: int) -> float:
    """Bytes alive inside one no-grad block forward: the residual stream (compute dtype) and its fp32 norm,
    q, k, v and the attention output, the FFN hidden and its gelu (2 x N x ffn), per-token modulation
    ([N, 6, D] fp32 plus 1 + scale / shift temporaries) when the batch has more than one sample."""
    nd = tok.packed * dit.dim
    peak = 2 * FP32 * nd + 5 * c * nd + 2 * c * tok.packed * dit.ffn
    if tok.per_token:
        peak += 6 * c * nd + 2 * 6 * FP32 * nd  # the [N, 6, D] temb, and its fp32 copy + sum in one block
    return peak + tok.batch * tok.text * dit.dim * c + 2 * tok.packed * dit.head_dim * FP32


def guidance_branches(cfg: ExperimentConfig) -> int:
    """DiT branches per guided sampling step of the run's `sample` section: the conditional one, the
    text-unconditional one under CFG (guidance != 1), the reference-free one under reference guidance."""
    refs = cfg.data.refs_max > 0
    return 1 + (cfg.sample.guidance != 1.0) + (refs and cfg.sample.reference_guidance != 1.0)


def generation_memory(cfg: ExperimentConfig, dit: DitShape, probe: FrozenCost, c: int) -> dict[str, float]:
    """One-GPU generation (generate.py: bf16 weights with diffusers' fp32 modules, umT5 offloaded once the
    prompts are encoded, CFG as one b = 1 DiT pass per branch): bytes by term and the peak of each phase."""
    d = cfg.data
    weights = (dit.params - dit.layers * dit.block_fp32_params) * c + dit.layers * dit.block_fp32_params * FP32
    one = tokens(cfg, probe.spatial, probe.temporal, worst=True)
    one = dataclasses.replace(one, batch=1, per_token=cfg.model.ref_timestep == "zero" and d.refs_max > 0)
    branches = guidance_branches(cfg)
    packed = dataclasses.replace(one, batch=branches, per_token=True)  # every branch as one packed batch
    latents = 6 * one.video * dit.in_channels * dit.patch_volume * FP32  # z, v, UniPC history (a few copies)
    umt5 = probe.umt5_params * c
    vae = probe.vae_params * c
    terms = {
        "DiT weights (bf16, fp32 norms / modulation)": weights,
        "umT5 encoder (while encoding the prompts)": umt5,
        "VAE": vae,
        "DiT pass, b = 1 per branch": dit_inference_peak(dit, one, c),
        f"DiT pass, {branches} branches as one batch (split_passes=False, not used)": dit_inference_peak(dit, packed, c),
        "latents and sampler state": latents,
        "VAE decode of one video": vae_decode_peak(cfg.model.scale, d.num_frames, d.height, d.width, c),
    }
    phases = {
        "peak encoding the prompts": weights + vae + umt5 + probe.text_peak,
        "peak sampling (umT5 offloaded)": weights + vae + latents + terms["DiT pass, b = 1 per branch"],
        "peak decoding": weights + vae + latents + terms["VAE decode of one video"],
    }
    out = {k: v / GiB for k, v in {**terms, **phases}.items()}
    out["peak"] = max(phases.values()) / GiB
    out["peak if umT5 stayed and the branches were one batch"] = (
        weights + vae + umt5 + latents
        + terms[f"DiT pass, {branches} branches as one batch (split_passes=False, not used)"]) / GiB
    return out


def make_plan(cfg: ExperimentConfig, world: int, gpu_mem_gib: float, mfu: float = 0.35,
              peak_tflops: float = 989.0, headroom: float = 0.1, overrides: tuple[str, ...] = ()) -> Plan:
    """Memory per rank, FLOPs and step time of `cfg` on `world` GPUs of `gpu_mem_gib` GiB."""
    from saber_pl.train import accumulation

    master, c = precision_bytes(cfg)
    dit = dit_shape(cfg.model)
    d = cfg.data
    text_encoder = d.text == "online"  # data.text: precomputed -> no umT5 on the training GPUs
    encode_clip = d.latents == "online"  # data.latents: cached -> no clip encode (the K reference encodes stay)
    fsdp = cfg.trainer.strategy == "fsdp2"
    accum = accumulation(cfg, world)
    probe = frozen_cost(cfg.model.scale, d.batch_size, d.num_frames, d.height, d.width, d.refs_max,
                        cfg.model.resolved_text_len, c)
    worst = tokens(cfg, probe.spatial, probe.temporal, worst=True)
    mean = tokens(cfg, probe.spatial, probe.temporal, worst=False)

    # training state: sharded on dim 0 over the ranks (fsdp2) or replicated; frozen encoders on every rank
    params = shard_bytes(dit.shapes, world if fsdp else 1, master)
    moments = (2 * params[0], 2 * params[1])  # exp_avg and exp_avg_sq, in the parameters' dtype
    state = {"DiT parameters": params, "gradients": params, "AdamW exp_avg + exp_avg_sq": moments}
    if cfg.optim.ema:
        state["EMA"] = params
    how = f"{'fp32' if master == FP32 else 'bf16'}{', sharded' if fsdp else ''}"
    mem = {f"{k} ({how})": v[1] for k, v in state.items()}
    grads = params[1]
    persistent = sum(mem.values()) - grads  # gradients exist from the first backward to the optimizer step
    dt = "bf16" if c == 2 else "fp32"
    frozen = {f"umT5 encoder ({dt}, every rank)": probe.umt5_params * c if text_encoder else 0,
              f"VAE ({dt}, every rank)": probe.vae_params * c}
    mem.update(frozen)
    persistent += sum(frozen.values())

    # transients of one micro-batch
    pixels = d.num_frames * d.height * d.width
    batch_in = d.batch_size * (3 * pixels + 4 * d.refs_max * d.height * d.width) * FP32  # video, refs, masks
    cast = d.batch_size * 3 * pixels * c if c != FP32 else 0  # encode_video's bf16 copy of the clip
    encode = max(probe.video_peak + cast if encode_clip else 0, probe.refs_peak,
                 probe.text_peak if text_encoder else 0)
    frozen_flops = (probe.refs_flops + (probe.video_flops if encode_clip else 0)
                    + (probe.text_flops if text_encoder else 0))
    act = dit_activations(dit, worst, c, cfg.model.gradient_checkpointing, "cuda", cfg.model.attn_backend)
    gathered = gathered_bytes(dit, c) if fsdp else 0
    extra = {}
    if not fsdp:  # DDP: a second fp32 copy of the gradients in its buckets; autocast's bf16 weight cache
        extra["DDP gradient buckets"] = params[1] if cfg.trainer.strategy == "ddp" and world > 1 else 0
        extra["autocast bf16 weight cache"] = dit.params * 2 if c == 2 and master == FP32 else 0
    optim_temp = params[1]  # foreach AdamW: sqrt(exp_avg_sq) of the local shards
    mem.update({"batch on the device (fp32)": batch_in, "VAE / umT5 encode (transient)": encode,
                "all-gathered blocks in flight": gathered, "DiT activations": act["total"], **extra,
                "AdamW step temporaries": optim_temp})
    phases = {  # with accumulation the gradients of earlier micro-batches are there while encoding
        "encode": persistent + (grads if accum > 1 else 0) + batch_in + encode,
        "forward + backward": persistent + grads + batch_in + gathered + act["total"] + sum(extra.values()),
        "optimizer step": persistent + grads + optim_temp,
    }
    peak = max(phases.values())
    usable = gpu_mem_gib * (1.0 - headroom)

    # FLOPs per micro-batch (forward), model (x3: forward + backward) and hardware (+ recompute + frozen)
    fl = dit_flops(dit, mean)
    model_micro = 3 * (fl["linear"] + fl["attention"])
    hw_micro = model_micro + (fl["blocks"] if cfg.model.gradient_checkpointing else 0) + frozen_flops
    rank_step = model_micro * accum
    step_time = rank_step / (mfu * peak_tflops * 1e12)
    flops = {"model per rank per step": rank_step, "hardware per rank per step": hw_micro * accum,
             "model global per step": rank_step * world, "frozen encoders per rank per step": frozen_flops * accum,
             "attention share": fl["attention"] / (fl["linear"] + fl["attention"])}
    attn = "SDPA per sample" if cfg.model.attn_backend == "sdpa" else "varlen / xformers (one packed call)"
    assumptions = [
        f"memory: worst case K={d.refs_max} references per clip, every reference token valid "
        f"({worst.packed:,.0f} tokens per micro-batch)",
        f"time: expected K={mean.refs_k:g}, coverage {mean.refs / max(mean.refs_k * mean.frame_patches, 1):.2f} "
        f"({mean.packed:,.0f} tokens per micro-batch)",
        f"GPU kernels: fused RMSNorm, {attn} attention; headroom {headroom:.0%} of the GPU memory for the CUDA "
        "context, NCCL and fragmentation",
        f"step time = model FLOPs / (MFU {mfu} x {peak_tflops:g} TFLOP/s)",
    ]
    if not text_encoder:
        assumptions.append("umT5 not on the training GPUs: data.text=precomputed (make precompute-text)")
    if not encode_clip:
        assumptions.append("no clip encode on the training GPUs: data.latents=cached (make cache-latents)")
    return Plan(
        exp=cfg.exp, scale=cfg.scale, world=world, gpu_mem_gib=gpu_mem_gib, usable_gib=usable, batch=d.batch_size,
        accumulation=accum, global_batch=world * d.batch_size * accum,
        tokens={"video per clip": worst.video, "references per clip (worst)": worst.refs,
                "references per clip (expected)": mean.refs, "per micro-batch (worst)": worst.packed,
                "per micro-batch (expected)": mean.packed},
        params={"DiT": dit.params, "DiT block": dit.block_params, "umT5 encoder": probe.umt5_params,
                "VAE": probe.vae_params},
        state=state, memory_gib={k: v / GiB for k, v in mem.items()},
        activations_gib={k: v / GiB for k, v in act.items() if k != "total"},
        phases_gib={k: v / GiB for k, v in phases.items()},
        peak_gib=peak / GiB, fits=peak / GiB <= usable, flops=flops, step_time_s=step_time, mfu=mfu,
        peak_tflops=peak_tflops, assumptions=assumptions, overrides=list(overrides),
        generation_gib=generation_memory(cfg, dit, probe, 2 if c == 2 or cfg.trainer.accelerator != 'cpu' else c))


def dit_flops(dit: DitShape, tok: Tokens) -> dict[str, float]:
    """Forward FLOPs of the DiT on one micro-batch: 2 x weights x tokens for every linear layer (the tokens it
    sees: packed N in the blocks, text for the cross-attention keys/values, every patch for the patch
    embedding, video tokens for the output), attention 4 x S^2 x D per clip and block, cross-attention
    4 x N x L x D per block."""
    text = tok.batch * tok.text
    patches = tok.batch * (tok.video + tok.refs_k * tok.frame_patches)
    seen = {"block": tok.packed, "block text": text, "text": text, "video": tok.batch * tok.video,
            "patches": patches, "time": tok.batch * tok.time_rows}
    linear = {role: 0.0 for role in seen}
    for role, w in dit.matmul:
        linear[role] += 2 * w * seen[role]
    attention = dit.layers * 4 * dit.dim * (tok.batch * tok.clip**2 + tok.packed * tok.text)
    blocks = linear["block"] + linear["block text"] + attention  # what checkpointing recomputes
    return {"linear": sum(linear.values()), "attention": attention, "blocks": blocks}


# ----------------------------------------------------------------------------------------------- verdict


@dataclass(frozen=True)
class Target:
    """What is planned: an experiment, a scale, overrides, a cluster and the plan's own settings."""

    exp: str
    scale: str
    overrides: tuple[str, ...]
    gpus: int
    gpu_mem_gib: float
    mfu: float = 0.35
    peak_tflops: float = 989.0
    headroom: float = 0.1

    def plan(self) -> Plan:
        return make_plan(_config(self), self.gpus, self.gpu_mem_gib, self.mfu, self.peak_tflops, self.headroom,
                         self.overrides)

    def but(self, *overrides: str, **changes: Any) -> Target:
        """This target with more overrides (later ones win) and other fields changed."""
        return dataclasses.replace(self, overrides=self.overrides + overrides, **changes)


def _config(target: Target) -> ExperimentConfig:
    return load_config(target.exp, target.scale, list(target.overrides))


def _with_gpus(target: Target, gpus: int) -> Target:
    """`target` on `gpus` GPUs; the global batch grows where the GPUs outnumber it."""
    cfg = _config(target)
    t = target.but(gpus=gpus)
    gb = cfg.trainer.global_batch
    if gb is not None and gb % (gpus * cfg.data.batch_size):
        t = t.but(f"trainer.global_batch={gpus * cfg.data.batch_size}")
    return t


def _gpus_that_fit(target: Target, limit: int = 4096) -> Target | None:
    """The fewest GPUs (doubling) on which `target` fits."""
    gpus = target.gpus * 2
    while gpus <= limit:
        if (t := _with_gpus(target, gpus)).plan().fits:
            return t
        gpus *= 2
    return None


def _frames_that_fit(target: Target, cfg: ExperimentConfig) -> Target | None:
    """The most frames (1 + 4k, fewer than now) with which `target` fits (binary search)."""
    lo, hi = 0, (cfg.data.num_frames - 1) // 4 - 1  # k of 1 + 4k frames
    best = None
    while lo <= hi:
        k = (lo + hi) // 2
        t = target.but(f"data.num_frames={1 + 4 * k}")
        if t.plan().fits:
            best, lo = t, k + 1
        else:
            hi = k - 1
    return best


SIDECARS = "/data/sidecars"  # a placeholder location in the overrides the verdict proposes


def knobs(target: Target) -> list[tuple[str, Target]]:
    """Single changes that lower the peak, cheapest for the recipe first (each is a new Target)."""
    cfg = _config(target)
    out = []
    if cfg.trainer.strategy != "fsdp2":
        out.append(("shard with FSDP2", target.but("trainer.strategy=fsdp2")))
    if cfg.optim.ema:
        out.append(("drop the EMA", target.but("optim.ema=false")))
    if not cfg.model.gradient_checkpointing:
        out.append(("per-block activation checkpointing", target.but("model.gradient_checkpointing=true")))
    if cfg.data.batch_size > 1:
        extra = () if cfg.trainer.global_batch else (
            f"trainer.accumulate_grad_batches={cfg.trainer.accumulate_grad_batches * cfg.data.batch_size}",)
        out.append(("batch 1 per GPU, more accumulation (same global batch)",
                    target.but("data.batch_size=1", *extra)))
    if cfg.data.text == "online":
        out.append(("precomputed text embeddings (make precompute-text)",
                    target.but("data.text=precomputed", f"data.text_sidecars={SIDECARS}/text")))
    if cfg.data.latents == "online":
        out.append(("cached clip latents (make cache-latents)",
                    target.but("data.latents=cached", f"data.latent_sidecars={SIDECARS}/latents")))
    return out


def verdict(target: Target, base: Plan | None = None) -> list[dict[str, Any]]:
    """The knobs that make a target fit: each alone, or (when none does) the cheapest combination."""
    base = base or target.plan()
    if base.fits:
        return []
    cfg = _config(target)
    found = []

    def add(label: str, t: Target | None, combined: bool = False) -> None:
        if t is not None:
            p = t.plan()
            found.append({"knob": label, "gpus": t.gpus, "overrides": list(t.overrides[len(target.overrides):]),
                          "peak_gib": round(p.peak_gib, 1), "fits": p.fits,
                          "step_time_s": round(p.step_time_s, 1), "combined": combined})

    for label, t in knobs(target):
        if t.plan().fits:
            add(label, t)
    if (t := _gpus_that_fit(target)) is not None:
        add(f"more GPUs: {t.gpus}", t)
    if (t := _frames_that_fit(target, cfg)) is not None:
        add(f"shorter clips: {_config(t).data.num_frames} frames", t)
    if found:
        return found
    # nothing alone: stack the cheap knobs, then the fewest GPUs (doubling) with the most frames that fit
    stacked, labels = target, []
    for label, _ in knobs(target):
        stacked = dict(knobs(stacked)).get(label, stacked)
        labels.append(label)
        if stacked.plan().fits:
            break
    if not stacked.plan().fits:
        gpus = stacked.gpus
        while gpus <= 4096:
            wider = _with_gpus(stacked, gpus)
            shorter = wider if wider.plan().fits else _frames_that_fit(wider, _config(wider))
            if shorter is not None:
                frames = _config(shorter).data.num_frames
                stacked = shorter
                labels += ([f"{gpus} GPUs"] if gpus != target.gpus else []) + (
                    [f"{frames} frames"] if frames != cfg.data.num_frames else [])
                break
            gpus *= 2
    add(" + ".join(labels), stacked, combined=True)
    return found


# ----------------------------------------------------------------------------------------------- output


def _fmt(x: float) -> str:
    return f"{x:,.0f}" if abs(x) >= 100 else f"{x:.2f}"


def table(p: Plan) -> str:
    """The plan as a readable text table."""
    lines = [f"plan: {p.exp} at {p.scale} on {p.world} GPU(s) x {p.gpu_mem_gib:g} GiB "
             f"(usable {p.usable_gib:.1f} GiB)" + (f"  overrides: {' '.join(p.overrides)}" if p.overrides else ""),
             f"  batch {p.batch} x {p.world} GPUs x accumulate {p.accumulation} = global batch {p.global_batch}",
             "  parameters: " + ", ".join(f"{k} {v:,}" for k, v in p.params.items()),
             "  tokens: " + ", ".join(f"{k} {_fmt(v)}" for k, v in p.tokens.items()),
             "", f"  {'memory per rank':58s} {'GiB':>8s}"]
    for k, v in p.memory_gib.items():
        lines.append(f"  {k:58s} {v:8.2f}")
        if k == "DiT activations":
            lines += [f"    {a:56s} {b:8.2f}" for a, b in p.activations_gib.items()]
    lines += [""] + [f"  peak of {k:50s} {v:8.2f}" for k, v in p.phases_gib.items()]
    lines += [f"  {'peak':58s} {p.peak_gib:8.2f}  of {p.usable_gib:.1f} usable", ""]
    f = p.flops
    model, hw, frozen = (f[k] / 1e15 for k in ("model per rank per step", "hardware per rank per step",
                                                 "frozen encoders per rank per step"))
    lines += [f"  model FLOPs per optimizer step (3 x the DiT forward): {model:.2f} PFLOP per rank, "
              f"{f['model global per step'] / 1e18:.3f} EFLOP global; attention {f['attention share']:.0%}",
              f"  hardware FLOPs (+ recompute forward, + frozen encoders {frozen:.2f} PFLOP): {hw:.2f} PFLOP "
              f"per rank (HFU {p.mfu * hw / model:.2f})",
              f"  step time {p.step_time_s:.3g} s at MFU {p.mfu} of {p.peak_tflops:g} TFLOP/s: "
              f"{p.global_batch / p.step_time_s:.2f} clips/s global", ""]
    if p.generation_gib:
        lines += [f"  {'generation on one GPU (make generate)':58s} {'GiB':>8s}"]
        lines += [f"  {k:58s} {v:8.2f}" for k, v in p.generation_gib.items()]
        verdict = "fits" if p.generation_gib["peak"] <= p.usable_gib else "does not fit"
        lines += [f"  generation {verdict} on one {p.gpu_mem_gib:g} GiB GPU", ""]
    lines += [f"  assumes {a}" for a in p.assumptions]
    lines.append("")
    if p.fits:
        lines.append(f"verdict: FITS ({p.peak_gib:.1f} of {p.usable_gib:.1f} GiB usable per GPU, "
                     f"{p.usable_gib - p.peak_gib:.1f} GiB to spare)")
    else:
        lines.append(f"verdict: DOES NOT FIT ({p.peak_gib:.1f} GiB needed, {p.usable_gib:.1f} usable per GPU)")
        for k in p.knobs:
            how = " ".join(k["overrides"] + ([f"--gpus {k['gpus']}"] if k["gpus"] != p.world else [])
                           )
            state = "fits" if k["fits"] else "still does not fit"
            lines.append(f"  {'together' if k['combined'] else 'alone'}: {k['knob']}: {k['peak_gib']} GiB, {state}"
                         f", step {k['step_time_s']} s   [{how}]")
        if not p.knobs:
            lines.append("  no knob tried makes it fit")
    return "\n".join(lines)


def as_json(p: Plan) -> str:
    d = dataclasses.asdict(p)
    d["state"] = {k: {"total_bytes": v[0], "rank_bytes": v[1]} for k, v in p.state.items()}
    return json.dumps(d, separators=(",", ":"))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--exp", default="saber_full", help="experiment (experiments/<exp>.yaml)")
    p.add_argument("--scale", default="14B", help="scale (experiments/scales/<scale>.yaml)")
    p.add_argument("--gpus", type=int, default=None, help="GPUs in the job (default: trainer.devices x num_nodes)")
    p.add_argument("--gpu-mem", type=float, default=80.0, help="memory per GPU in GiB (80 for H100 80GB)")
    p.add_argument("--mfu", type=float, default=0.35, help="model FLOPs utilisation assumed for the step time")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak per GPU (H100/H200: 989)")
    p.add_argument("--headroom", type=float, default=0.1, help="fraction of the GPU memory kept free")
    p.add_argument("--json", action="store_true", help="print one JSON line instead of the table")
    p.add_argument("overrides", nargs="*", help="config overrides key.sub=value (as saber_pl.train)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config(args.exp, args.scale, args.overrides)
        gpus = args.gpus
        if gpus is None:
            if not isinstance(cfg.trainer.devices, int):
                raise ConfigError("trainer.devices is 'auto': pass --gpus N (GPUS=N)")
            gpus = cfg.trainer.devices * cfg.trainer.num_nodes
        target = Target(args.exp, args.scale, tuple(args.overrides), gpus, args.gpu_mem, args.mfu,
                        args.peak_tflops, args.headroom)
        plan = target.plan()
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    plan.knobs = verdict(target, plan)
    print(as_json(plan) if args.json else table(plan))
    return 0


if __name__ == "__main__":
    sys.exit(main())
