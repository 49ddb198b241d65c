"""Reference images for inference: segment, fill the background with gray, fit to the video size.

Saber feeds references in the training format (SABER.md, Inference): the subject's foreground on a
gray background, resized and padded to the video size keeping the aspect ratio, plus its mask.
``subject_size`` (ours) instead crops a subject to its bounding box and shows it at a set fraction of
the frame, for a model that draws the subject at the size its reference shows it.
Background-scene references are used whole (mask = all ones). The segmenter is pluggable:

- ``alpha``: the alpha channel of an RGBA/LA PNG (alpha > 127 = foreground);
- ``mask_file``: a user-supplied mask image per reference (> 127 = foreground);
- ``birefnet``: BiRefNet (the paper's segmenter) loaded from a LOCAL folder with transformers;
- ``auto``: mask file if given, else an informative alpha channel, else BiRefNet if a folder is
  configured, else a clear error.

Gray is 0 in [-1, 1] pixel space, i.e. 127.5 in uint8 (saved PNGs round it to 128): exactly the fill
the training references get (SABER.md step 4), so the model sees the same "nothing here" value.

Usage::

    refs, masks = prepare_references([Reference("dog.png"), Reference("park.jpg", kind="scene")],
                                     ReferenceConfig(height=480, width=832))
    save_references(refs, masks, "runs/sample.mp4")  # runs/sample_ref0.png, runs/sample_ref0_mask.png, ...
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

RefKind = Literal["subject", "scene"]
REF_KINDS = ("subject", "scene")
SEGMENTER_NAMES = ("auto", "alpha", "mask_file", "birefnet")
IMAGENET_MEAN = (0.485, 0.456, 0.406)  # BiRefNet's input normalisation
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class ReferenceConfig:
    """How references are prepared for the model (inference side of SABER.md)."""

    height: int = 480  # video height in pixels (released samples are 832x480)
    width: int = 832  # video width in pixels
    segmenter: Literal["auto", "alpha", "mask_file", "birefnet"] = "auto"  # how subjects are cut out
    birefnet_dir: str | None = None  # local BiRefNet folder (the paper's segmenter); never downloaded
    birefnet_size: int = 1024  # BiRefNet input resolution (square)
    birefnet_threshold: float = 0.5  # foreground where sigmoid(logit) > threshold
    device: str = "cpu"  # device BiRefNet runs on
    min_foreground: float = 0.001  # a segmentation covering less than this fraction is "nothing found"
    max_references: int = 6  # (ours) training uses K in 1-3; the paper sees quality collapse near 12
    # (ours) a subject's bounding box shown at this fraction of the frame's shorter side, centred; None = the
    # paper's fit (the whole image resized and padded). A small model draws the subject at about the size its
    # reference shows it (docs/bench_mini.md, eleventh round); scene references are always used whole.
    subject_size: float | None = None

    def __post_init__(self) -> None:
        if self.height < 8 or self.width < 8:
            raise ValueError(f"height/width must be >= 8, got {self.height}x{self.width}")
        if self.segmenter not in SEGMENTER_NAMES:
            raise ValueError(f"segmenter must be one of {SEGMENTER_NAMES}, got {self.segmenter!r}")
        if self.segmenter == "birefnet" and not self.birefnet_dir:
            raise ValueError("birefnet_dir must be set when segmenter='birefnet'")
        if self.birefnet_size < 32:
            raise ValueError(f"birefnet_size must be >= 32, got {self.birefnet_size}")
        if not 0.0 < self.birefnet_threshold < 1.0:
            raise ValueError(f"birefnet_threshold must be in (0, 1), got {self.birefnet_threshold}")
        if not 0.0 <= self.min_foreground < 1.0:
            raise ValueError(f"min_foreground must be in [0, 1), got {self.min_foreground}")
        if self.max_references < 1:
            raise ValueError(f"max_references must be >= 1, got {self.max_references}")
        if self.subject_size is not None and not 0.0 < self.subject_size <= 1.0:
            raise ValueError(f"subject_size must be in (0, 1] (a fraction of the frame's shorter side) or None, "
                             f"got {self.subject_size}")


@dataclass
class Reference:
    """One reference image: a `subject` (segmented) or a `scene` (used whole)."""

    path: str  # image file (any format PIL reads)
    kind: str = "subject"  # "subject" or "scene"
    mask_path: str | None = None  # optional user mask for this image (> 127 = foreground)


# ---------------------------------------------------------------------------------------------------
# loading


def load_image(path: str | Path) -> Image.Image:
    """Open and fully decode an image; a missing or unreadable file raises naming the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"reference image not found: {path}")
    try:
        with Image.open(path) as image:
            image.load()
            return image.copy()
    except (UnidentifiedImageError, OSError, ValueError) as exn:
        raise ValueError(f"cannot read reference image {path}: {exn}") from exn


def has_alpha(image: Image.Image) -> bool:
    """Whether the image carries an informative alpha channel (some pixel not fully opaque)."""
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        alpha = np.asarray(image.convert("RGBA"))[..., 3]
        return bool(alpha.min() < 255)
    return False


def image_to_tensor(image: Image.Image) -> torch.Tensor:
    """PIL image -> float RGB [3, H, W] in [0, 1]."""
    rgb = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0  # [H, W, 3]
    return torch.from_numpy(rgb).permute(2, 0, 1).contiguous()


# ---------------------------------------------------------------------------------------------------
# segmenters


class Segmenter(Protocol):
    """Foreground of one reference image: float {0, 1} [H, W] at the image's own size."""

    def __call__(self, image: Image.Image, ref: Reference) -> torch.Tensor: ...


class AlphaSegmenter:
    """Foreground = alpha > 127 (cut-outs saved as RGBA PNGs)."""

    def __call__(self, image: Image.Image, ref: Reference) -> torch.Tensor:
        if image.mode not in ("RGBA", "LA", "PA") and not (image.mode == "P" and "transparency" in image.info):
            raise ValueError(f"segmenter 'alpha' needs an image with an alpha channel: {ref.path} is {image.mode}")
        alpha = np.asarray(image.convert("RGBA"))[..., 3]  # [H, W] uint8
        return torch.from_numpy(alpha > 127).float()


class MaskFileSegmenter:
    """Foreground = the user's mask image > 127 (any format; converted to grayscale)."""

    def __call__(self, image: Image.Image, ref: Reference) -> torch.Tensor:
        if not ref.mask_path:
            raise ValueError(f"segmenter 'mask_file' needs a mask_path for {ref.path}")
        mask = load_image(ref.mask_path).convert("L")
        if mask.size != image.size:
            raise ValueError(
                f"mask {ref.mask_path} is {mask.size[0]}x{mask.size[1]} but image {ref.path} is "
                f"{image.size[0]}x{image.size[1]}"
            )
        return torch.from_numpy(np.asarray(mask) > 127).float()


def birefnet_preprocess(image: Image.Image, size: int = 1024) -> torch.Tensor:
    """BiRefNet's standard input: RGB resized to size x size, ImageNet-normalised: [1, 3, size, size]."""
    resized = image.convert("RGB").resize((size, size), Image.BILINEAR)
    x = image_to_tensor(resized)  # [3, S, S]
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return ((x - mean) / std).unsqueeze(0)


def birefnet_postprocess(outputs: object, height: int, width: int, threshold: float = 0.5) -> torch.Tensor:
    """Sigmoid of BiRefNet's last output, resized to the image, thresholded: float {0, 1} [H, W].

    BiRefNet returns a list of side outputs (coarse to fine); the last one is the final logit map.
    """
    logits = outputs[-1] if isinstance(outputs, (list, tuple)) else outputs
    prob = torch.as_tensor(logits).float().sigmoid()  # [1, 1, S, S]
    prob = prob.reshape(1, 1, *prob.shape[-2:])
    prob = F.interpolate(prob, size=(height, width), mode="bilinear", align_corners=False)
    return (prob[0, 0] > threshold).float()


class BiRefNetSegmenter:
    """BiRefNet from a local folder (transformers remote code, never downloaded), loaded on first use."""

    def __init__(self, local_dir: str, size: int = 1024, threshold: float = 0.5, device: str = "cpu",
                 model: Callable[[torch.Tensor], object] | None = None) -> None:
        self.local_dir, self.size, self.threshold, self.device = local_dir, size, threshold, device
        self._model = model  # a callable stand-in for tests; None = load from local_dir

    def check(self) -> None:
        """Fail early (before any image is segmented) if the weights folder is missing."""
        if self._model is None and not Path(self.local_dir).is_dir():
            raise FileNotFoundError(f"BiRefNet folder not found: {self.local_dir}")

    def _load(self) -> Callable[[torch.Tensor], object]:
        if self._model is None:
            self.check()
            from transformers import AutoModelForImageSegmentation

            model = AutoModelForImageSegmentation.from_pretrained(
                self.local_dir, trust_remote_code=True, local_files_only=True
            )
            self._model = model.to(self.device).eval()
        return self._model

    @torch.no_grad()
    def __call__(self, image: Image.Image, ref: Reference) -> torch.Tensor:
        model = self._load()
        x = birefnet_preprocess(image, self.size).to(self.device)
        dtype = next(model.parameters()).dtype if isinstance(model, torch.nn.Module) else torch.float32
        outputs = model(x.to(dtype))
        return birefnet_postprocess(outputs, image.size[1], image.size[0], self.threshold).cpu()


class AutoSegmenter:
    """Mask file if given, else an informative alpha channel, else BiRefNet if configured, else an error."""

    def __init__(self, birefnet: BiRefNetSegmenter | None = None) -> None:
        self.alpha, self.mask_file, self.birefnet = AlphaSegmenter(), MaskFileSegmenter(), birefnet

    def choose(self, image: Image.Image, ref: Reference) -> Segmenter:
        """The segmenter `auto` uses for this image (cheap: no model is loaded)."""
        if ref.mask_path:
            return self.mask_file
        if has_alpha(image):
            return self.alpha
        if self.birefnet is not None:
            return self.birefnet
        raise ValueError(
            f"no segmentation for subject reference {ref.path}: give a mask file (mask_path), save it as an "
            "RGBA PNG whose alpha marks the subject, set birefnet_dir to a local BiRefNet folder, "
            "or mark it kind='scene' to use the whole image"
        )

    def __call__(self, image: Image.Image, ref: Reference) -> torch.Tensor:
        return self.choose(image, ref)(image, ref)


def build_segmenter(cfg: ReferenceConfig, birefnet_model: Callable | None = None) -> Segmenter:
    """The segmenter named by `cfg.segmenter` (`birefnet_model` replaces the loaded network in tests)."""
    birefnet = None
    if cfg.birefnet_dir or birefnet_model is not None:
        birefnet = BiRefNetSegmenter(cfg.birefnet_dir or "", cfg.birefnet_size, cfg.birefnet_threshold,
                                     cfg.device, model=birefnet_model)
    if cfg.segmenter == "alpha":
        return AlphaSegmenter()
    if cfg.segmenter == "mask_file":
        return MaskFileSegmenter()
    if cfg.segmenter == "birefnet":
        assert birefnet is not None  # guaranteed by ReferenceConfig validation
        return birefnet
    return AutoSegmenter(birefnet)


# ---------------------------------------------------------------------------------------------------
# fitting to the video


def fit_to_video(image: torch.Tensor, mask: torch.Tensor, height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Resize keeping the aspect ratio, centre, pad; gray (0) outside the mask and in the padding.

    image: float [3, h, w] in [0, 1]; mask: float {0, 1} [h, w].
    Returns ref float [3, H, W] in [-1, 1] (0 = gray outside the mask) and mask float {0, 1} [1, H, W].
    """
    h, w = mask.shape
    scale = min(height / h, width / w)
    nh, nw = max(1, min(height, round(h * scale))), max(1, min(width, round(w * scale)))
    img = F.interpolate(image[None], size=(nh, nw), mode="bilinear", align_corners=False, antialias=True)[0]
    m = F.interpolate(mask[None, None], size=(nh, nw), mode="bilinear", align_corners=False, antialias=True)[0]
    m = (m > 0.5).float()  # [1, nh, nw]
    img = (img.clamp(0, 1) * 2 - 1) * m  # [3, nh, nw], gray (0) outside the mask
    top, left = (height - nh) // 2, (width - nw) // 2
    ref = torch.zeros(3, height, width)
    out_mask = torch.zeros(1, height, width)
    ref[:, top : top + nh, left : left + nw] = img
    out_mask[:, top : top + nh, left : left + nw] = m
    return ref, out_mask


def fit_subject(image: torch.Tensor, mask: torch.Tensor, height: int, width: int, size: float
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Crop to the mask's bounding box, then fit it so its longer side is `size` x min(height, width), centred.

    image: float [3, h, w] in [0, 1]; mask: float {0, 1} [h, w] with some foreground.
    Returns ref float [3, H, W] in [-1, 1] (gray outside the mask) and mask float {0, 1} [1, H, W].
    """
    ys, xs = torch.nonzero(mask > 0.5, as_tuple=True)
    top, bottom, left, right = int(ys.min()), int(ys.max()) + 1, int(xs.min()), int(xs.max()) + 1
    side = max(1, round(size * min(height, width)))  # the box's longer side in video pixels
    box_h, box_w = bottom - top, right - left
    scale = side / max(box_h, box_w)
    inner_h, inner_w = min(height, max(1, round(box_h * scale))), min(width, max(1, round(box_w * scale)))
    ref, out_mask = fit_to_video(image[:, top:bottom, left:right], mask[top:bottom, left:right], inner_h, inner_w)
    full_ref, full_mask = torch.zeros(3, height, width), torch.zeros(1, height, width)
    oy, ox = (height - inner_h) // 2, (width - inner_w) // 2
    full_ref[:, oy:oy + inner_h, ox:ox + inner_w] = ref
    full_mask[:, oy:oy + inner_h, ox:ox + inner_w] = out_mask
    return full_ref, full_mask


def _as_reference(ref: Reference | str) -> Reference:
    return ref if isinstance(ref, Reference) else Reference(str(ref))


def validate_references(refs: list[Reference], cfg: ReferenceConfig) -> list[Image.Image]:
    """Check count, kinds, files and mask files; return the decoded images. No model runs here."""
    if not refs:
        raise ValueError("at least one reference image is needed")
    if len(refs) > cfg.max_references:
        raise ValueError(f"{len(refs)} references given, max_references is {cfg.max_references}")
    for ref in refs:
        if ref.kind not in REF_KINDS:
            raise ValueError(f"unknown reference kind {ref.kind!r} for {ref.path}: use one of {REF_KINDS}")
    images = [load_image(ref.path) for ref in refs]
    for ref, image in zip(refs, images):
        if ref.kind != "subject":
            continue
        if ref.mask_path:
            load_image(ref.mask_path)
        elif cfg.segmenter == "mask_file":
            raise ValueError(f"segmenter 'mask_file' needs a mask_path for {ref.path}")
        if cfg.segmenter == "alpha" and not has_alpha(image):
            raise ValueError(f"segmenter 'alpha' needs an image with transparent pixels: {ref.path} has none")
    return images


def prepare_references(
    refs: list[Reference | str], cfg: ReferenceConfig | None = None, segmenter: Segmenter | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference images -> (refs float [K, 3, H, W] in [-1, 1], masks float {0, 1} [K, 1, H, W]).

    Every input is checked (files, kinds, count, and for `auto` that each subject has a way to be
    segmented) before any segmentation model is loaded.
    """
    cfg = cfg or ReferenceConfig()
    refs = [_as_reference(r) for r in refs]
    images = validate_references(refs, cfg)
    segmenter = segmenter or build_segmenter(cfg)
    chosen: list[Segmenter | None] = []
    for ref, image in zip(refs, images):  # resolve `auto` up front so a missing segmentation fails early
        if ref.kind == "scene":
            chosen.append(None)
        else:
            chosen.append(segmenter.choose(image, ref) if isinstance(segmenter, AutoSegmenter) else segmenter)
    for seg in chosen:
        if isinstance(seg, BiRefNetSegmenter):
            seg.check()
    out_refs, out_masks = [], []
    for ref, image, seg in zip(refs, images, chosen):
        if seg is None:
            mask = torch.ones(image.size[1], image.size[0])  # [h, w] scene: used whole
        else:
            mask = seg(image, ref)  # [h, w]
            fraction = float(mask.mean())
            if fraction < max(cfg.min_foreground, 1e-12):
                raise ValueError(
                    f"empty segmentation for {ref.path}: foreground covers {fraction:.4%} of the image "
                    f"(min_foreground {cfg.min_foreground:.4%}); check the mask/alpha or use kind='scene'"
                )
        if seg is not None and cfg.subject_size is not None:
            r, m = fit_subject(image_to_tensor(image), mask, cfg.height, cfg.width, cfg.subject_size)
        else:
            r, m = fit_to_video(image_to_tensor(image), mask, cfg.height, cfg.width)
        if seg is not None and not bool(m.any()):
            raise ValueError(f"empty segmentation for {ref.path}: the foreground vanishes at {cfg.width}x{cfg.height}")
        out_refs.append(r)
        out_masks.append(m)
    return torch.stack(out_refs), torch.stack(out_masks)  # [K, 3, H, W], [K, 1, H, W]


def save_references(refs: torch.Tensor, masks: torch.Tensor, out_path: str | Path) -> list[Path]:
    """Write what the model saw next to `out_path`: <stem>_ref<k>.png (gray = 128) and <stem>_ref<k>_mask.png."""
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    written = []
    for k in range(refs.shape[0]):
        rgb = ((refs[k].clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()  # [H, W, 3]
        gray = (masks[k, 0] > 0.5).to(torch.uint8).mul(255).numpy()  # [H, W]
        for suffix, array in (("", rgb), ("_mask", gray)):
            path = out_path.with_name(f"{out_path.stem}_ref{k}{suffix}.png")
            Image.fromarray(array).save(path)
            written.append(path)
    return written
