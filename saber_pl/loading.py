"""Start-up within a node's memory: the DiT built on the meta device, sharded, then each rank reads its slices.

Under ``strategy: fsdp2`` with the DiT's weights in a Wan folder (1.3B/14B, or any scale given
`model.wan_dir`), no process ever holds the whole DiT (57 GB in fp32 at 14B, x8 ranks a node):

    dit = meta_dit(cfg.model, folder)              # SaberModule.__init__: no memory, widened / image branch dropped
    ema = copy.deepcopy(dit)                       #   the EMA: another meta model
    shard_transformer(dit, mesh); shard_transformer(ema, mesh)     # configure_model: FSDP2 on meta
    load_local_shards(dit, folder, device)         #   to_empty + each DTensor's local rows from the safetensors
    copy_local_shards(ema, dit)                    #   the EMA's shards are copies of the DiT's local shards

`load_local_shards` reads, for every parameter, only the block of the file tensor that the rank's local
shard covers (`safe_open(...).get_slice(key)[rows]`, FSDP2's `Shard(0)` rows, uneven last shard), in the
parameter's dtype (fp32 master weights). A T2V patch embedding (C input channels) fills the first C
channels of Saber's 2C+4 and the rest is zero (dit.widen_patch_embedding); an I2V folder's image branch is
never read (dit.drop_image_branch). Rows are read in chunks of `CHUNK_BYTES`, each under its own
`safe_open`, so the file pages a read maps are released before the next (an open file's touched pages
count in the process's RSS).
The frozen VAE and umT5 of a real scale are loaded lazily, in the run's compute dtype straight onto the
rank's device (`LazyFrozenParts`).
"""

from __future__ import annotations

import functools
import json
import logging
import time
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.distributed as dist
from diffusers import WanTransformer3DModel
from safetensors import safe_open
from torch import Tensor, nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import _CHECKPOINT_PREFIX
from torch.distributed.tensor import DTensor
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

from saber_pl.config import ExperimentConfig
from saber_pl.dit import SaberTransformer
from saber_pl.wan import (
    ModelConfig, TextEncoder, VideoVAE, check_init, dit_folder, load_pretrained_frozen, load_tokenizer, rebuild_rope,
    resolve_wan_dir, saber_dit, tokenize,
)

log = logging.getLogger(__name__)

WEIGHTS = "diffusion_pytorch_model.safetensors"
INDEX = "diffusion_pytorch_model.safetensors.index.json"
CHUNK_BYTES = 16 << 20  # rows read per safe_open: bounds the file pages mapped at once


def sharded_dit_folder(cfg: ExperimentConfig) -> Path | None:
    """`wan_dir/transformer` when this run builds the DiT on meta and loads its shards (fsdp2 + weights)."""
    return dit_folder(cfg.model) if cfg.trainer.strategy == "fsdp2" else None


def meta_dit(cfg: ModelConfig, folder: Path) -> SaberTransformer:
    """The Saber DiT of the folder's config on the meta device, in Saber's layout (no weights read)."""
    config = WanTransformer3DModel.load_config(folder, local_files_only=True)
    check_init(cfg, config, folder)
    with torch.device("meta"):
        wan = WanTransformer3DModel.from_config(config)
    return saber_dit(cfg, wan)  # widens (T2V) or drops the image branch (I2V), on meta


def weight_files(folder: Path) -> dict[str, Path]:
    """Tensor name -> safetensors file of a diffusers model folder (one file, or shards with an index)."""
    if (folder / INDEX).is_file():
        return {k: folder / v for k, v in json.loads((folder / INDEX).read_text())["weight_map"].items()}
    if (folder / WEIGHTS).is_file():
        with safe_open(folder / WEIGHTS, framework="pt") as f:
            return dict.fromkeys(f.keys(), folder / WEIGHTS)
    raise FileNotFoundError(f"{folder} has no {WEIGHTS} (or {INDEX}): sharded loading reads safetensors "
                            f"in slices; convert a .bin checkpoint to safetensors")


def state_tensors(model: nn.Module) -> Iterator[tuple[str, Tensor]]:
    """(state-dict key, tensor) of every parameter and persistent buffer, checkpoint wrappers unwrapped."""
    for prefix, module in model.named_modules():
        skip = getattr(module, "_non_persistent_buffers_set", set())
        tensors = list(module.named_parameters(recurse=False)) + [
            (n, b) for n, b in module.named_buffers(recurse=False) if n not in skip and b is not None]
        for name, tensor in tensors:
            yield f"{prefix}.{name}".lstrip(".").replace(_CHECKPOINT_PREFIX, ""), tensor


def local_box(tensor: Tensor) -> tuple[Tensor, tuple[int, ...], tuple[int, ...]]:
    """The rank's local tensor of a (DTensor) parameter and the global offset and shape of the block it holds."""
    data = tensor.data if isinstance(tensor, nn.Parameter) else tensor
    if not isinstance(data, DTensor):
        return data, (0,) * data.ndim, tuple(data.shape)
    local = data.to_local()
    shape, offset = compute_local_shape_and_global_offset(data.shape, data.device_mesh, data.placements)
    if tuple(shape) != tuple(local.shape):  # FSDP2 and DTensor must agree on who holds which rows
        raise RuntimeError(f"local shard {tuple(local.shape)} != DTensor's {tuple(shape)} for {data.placements}")
    return local, tuple(offset), tuple(shape)


def _widened(key: str, file_shape: tuple[int, ...], shape: tuple[int, ...]) -> bool:
    """The T2V patch embedding in Saber's wider layout: same shape but more input channels (dim 1)."""
    return (key == "patch_embedding.weight" and len(file_shape) == len(shape) and file_shape[1] < shape[1]
            and file_shape[:1] + file_shape[2:] == shape[:1] + shape[2:])


@torch.no_grad()
def _read_local(local: Tensor, offset: tuple[int, ...], global_shape: tuple[int, ...], path: Path, key: str) -> int:
    """Fill `local` (the block at `offset` of a `global_shape` tensor) from `key` in `path`; returns elements read.

    Rows are read in chunks of about `CHUNK_BYTES`, each under its own `safe_open`: the file pages a read
    maps count in the process's RSS until the file is closed.
    """
    with safe_open(path, framework="pt", device="cpu") as f:
        file_shape = tuple(f.get_slice(key).get_shape())
    if file_shape != global_shape and not _widened(key, file_shape, global_shape):
        raise ValueError(f"{path}: {key} has shape {file_shape}, the model expects {global_shape}")
    box = [slice(min(o, n), min(o + s, n)) for o, s, n in zip(offset, local.shape, file_shape)]
    sizes = [b.stop - b.start for b in box]
    if sizes != list(local.shape):
        local.zero_()  # channels the file does not have (widened patch embedding) start at zero
    if local.ndim == 0:  # a scalar: nothing to shard
        with safe_open(path, framework="pt", device="cpu") as f:
            local.copy_(f.get_tensor(key))
        return 1
    if 0 in sizes:
        return 0
    dst = local[tuple(slice(0, n) for n in sizes)]
    rows = max(1, CHUNK_BYTES // (dst[0].numel() * local.element_size()))
    for first in range(0, sizes[0], rows):
        end = min(first + rows, sizes[0])
        with safe_open(path, framework="pt", device="cpu") as f:
            src = f.get_slice(key)[(slice(box[0].start + first, box[0].start + end), *box[1:])]
            dst[first:end].copy_(src)  # cast to the parameter's dtype on copy
            del src
    return int(torch.Size(sizes).numel())


def load_local_shards(model: SaberTransformer, folder: Path, device: str | torch.device) -> SaberTransformer:
    """Materialise a (FSDP2-sharded) meta DiT on `device` and fill each rank's local shards from `folder`.

    Reads only the rows each local shard covers; raises if a weight is missing or has the wrong shape.
    The image branch of an I2V folder is skipped; the RoPE tables (non-persistent) are rebuilt.
    """
    start = time.perf_counter()
    files = weight_files(folder)
    ours = dict(state_tensors(model.wan))
    missing = sorted(set(ours) - set(files))
    if missing:
        raise ValueError(f"{folder} lacks {len(missing)} DiT weight(s): {missing[:5]}")
    model.to_empty(device=device)
    read = 0
    for key, tensor in state_tensors(model.wan):  # after to_empty: the materialised tensors
        local, offset, _ = local_box(tensor)
        read += _read_local(local, offset, tuple(tensor.shape), files[key], key) * local.element_size()
    rebuild_rope(model)
    if not dist.is_initialized() or dist.get_rank() == 0:
        log.info("loaded the local shards of %d DiT tensors from %s (%.2f GB on rank 0) in %.1f s", len(ours),
                 folder, read / 1e9, time.perf_counter() - start)
    return model


@torch.no_grad()
def copy_local_shards(model: SaberTransformer, source: SaberTransformer) -> SaberTransformer:
    """Materialise `model` (sharded like `source`) on source's device with a copy of source's local shards."""
    theirs = dict(state_tensors(source.wan))
    device = source.wan.patch_embedding.weight.device
    model.to_empty(device=device)
    for key, tensor in state_tensors(model.wan):
        dst, src = local_box(tensor)[0], local_box(theirs[key])[0]
        if dst.shape != src.shape:
            raise ValueError(f"{key}: local shard {tuple(dst.shape)} vs source {tuple(src.shape)}: shard alike")
        dst.copy_(src)
    return rebuild_rope(model)


class LazyFrozenParts:
    """The frozen VAE and umT5 of a Wan folder, loaded on the first `to(device, dtype)` (Lightning's setup):
    straight onto the rank's device in the run's compute dtype, never float32 on the CPU first.

    The same interface as module.FrozenParts (`vae`, `text_encoder`, `tokenize`, `to`); the tokenizer is
    loaded at once, for the dataloader workers. `text_encoder=False` (data.text=precomputed): neither umT5
    nor its tokenizer is read (`text_encoder` and `tokenize` are None; the folder needs only `vae/`).
    """

    def __init__(self, cfg: ModelConfig, text_encoder: bool = True) -> None:
        self.root = resolve_wan_dir(cfg, ("vae", "text_encoder", "tokenizer") if text_encoder else ("vae",))
        self.text_len = cfg.resolved_text_len
        self.with_text = text_encoder
        self.tokenizer = load_tokenizer(self.root) if text_encoder else None
        self.tokenize = functools.partial(tokenize, self.tokenizer, text_len=self.text_len) if text_encoder else None
        self._parts: tuple[VideoVAE, TextEncoder | None] | None = None

    def to(self, device: torch.device, dtype: torch.dtype) -> None:
        if self._parts is None:
            self._parts = load_pretrained_frozen(self.root, self.text_len, dtype, device=device, vae_dtype=dtype,
                                                 tokenizer=self.tokenizer, text_encoder=self.with_text)
        for part in self._parts:
            if part is not None:
                part.to(device=device, dtype=dtype)

    def _loaded(self) -> tuple[VideoVAE, TextEncoder | None]:
        if self._parts is None:  # used before any `to`: on the CPU in float32
            self.to(torch.device("cpu"), torch.float32)
        return self._parts

    @property
    def vae(self) -> VideoVAE:
        return self._loaded()[0]

    @property
    def text_encoder(self) -> TextEncoder | None:
        return self._loaded()[1] if self.with_text else None
