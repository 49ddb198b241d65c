"""Does a trained DiT read a caption's words? The held-out flow loss with one word swapped.

Text following (scene.py) needs a generated subject before it can see a direction, so at 0 it cannot say
whether the model ignores the direction word or only fails to draw. This probe asks the DiT directly: noise
each case's real clip to t, predict the velocity once with the true caption and once with its direction
word (or background word) swapped ("left" <-> "right", "up" <-> "down"; "plain" <-> "checkered",
"striped" <-> "gradient"), and compare the losses:

    reliance = (loss(swapped) - loss(true)) / loss(true),  averaged over `ts`, per case

0 = the word changes nothing the model predicts (a model that ignores the text scores exactly 0);
> 0 = the wrong word makes its prediction worse, so it uses the word. Text only (no references), the
same noise for both captions, so the difference is the word's alone.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:  # generate imports the whole model stack; the probe only needs its types
    from saber_pl.generate import Generator, VideoSpec

DIRECTION_SWAPS = {"left": "right", "right": "left", "up": "down", "down": "up"}
BACKGROUND_SWAPS = {"plain": "checkered", "checkered": "plain", "striped": "gradient", "gradient": "striped"}


def swap_words(caption: str, swaps: dict[str, str]) -> str:
    """`caption` with every whole word in `swaps` replaced at once (so left -> right never becomes left)."""
    pattern = re.compile(r"\b(" + "|".join(map(re.escape, swaps)) + r")\b")
    return pattern.sub(lambda m: swaps[m.group(1)], caption)


@torch.no_grad()
def caption_reliance(gen: Generator, clips: Tensor, captions: list[str], swaps: dict[str, str],
                     ts: tuple[float, ...] = (0.5, 0.7, 0.9), seed: int = 0, batch: int = 32) -> list[float]:
    """Per case, the relative loss increase when `swaps` is applied to its caption (see module docstring).

    `gen` is a `saber_pl.generate.Generator`; clips [N, 3, F, H, W] in [-1, 1]; captions N strings.
    A case whose caption has no word to swap gets NaN.
    """
    if clips.shape[0] != len(captions):
        raise ValueError(f"{clips.shape[0]} clips but {len(captions)} captions")
    swapped = [swap_words(c, swaps) for c in captions]
    out: list[float] = []
    for i in range(0, len(captions), batch):
        z0 = gen.vae.encode(clips[i:i + batch].to(gen.device)).to(gen.dtype)  # [b, C, f, h, w]
        noise = torch.randn(z0.shape, generator=torch.Generator().manual_seed(seed + i)).to(z0)
        true_text = gen.encode_prompts(captions[i:i + batch])  # [b, L, D]
        swap_text = gen.encode_prompts(swapped[i:i + batch])
        gain = torch.zeros(z0.shape[0], dtype=torch.float64)
        for t in ts:
            tt = torch.full((z0.shape[0],), t, device=z0.device, dtype=z0.dtype)
            z_t = (1 - t) * z0 + t * noise
            target = noise - z0
            losses = []
            for text in (true_text, swap_text):
                v = gen.dit(z_t, tt * 1000.0, text, None, None, None)
                losses.append(((v.float() - target.float()) ** 2).flatten(1).mean(1).double().cpu())
            gain += (losses[1] - losses[0]) / losses[0]
        for j, (a, b) in enumerate(zip(captions[i:i + batch], swapped[i:i + batch])):
            out.append(float(gain[j] / len(ts)) if a != b else float("nan"))
    return out


@torch.no_grad()
def noise_layout_gap(gen: Generator, captions: list[str], swaps: dict[str, str], t: float = 0.98, noises: int = 16,
                     seed: int = 0, video: VideoSpec | None = None) -> float:
    """How much the DiT's picture from (nearly) pure noise changes when a word is swapped: RMS pixel gap.

    `caption_reliance` asks whether a word lowers the loss on real clips at mid t, where z_t already shows
    the layout. This asks where the sampler places the subject: fed `noises` pure-noise latents at t (the
    same noises for both captions, as z_t), the clean-latent estimate z_t - t v is decoded for the caption
    and for its swapped version; the figure is the RMS difference of the two videos (pixels in [-1, 1]),
    averaged over the captions that have a word to swap (`video`: the size, default the run's). 0 = the
    word does not move what is drawn at the start of sampling (a DiT that ignores the text scores 0).
    The shipped mini t2v_baseline scores 0.0047 for the direction word against 0.024 for the background
    word (`benchmarks/layout_probe.py`, 16 bench prompts; docs/bench_mini.md, seventh round).
    """
    pairs = [(c, swap_words(c, swaps)) for c in captions]
    pairs = [(a, b) for a, b in pairs if a != b]
    if not pairs:
        raise ValueError("no caption has a word to swap")
    fs, ft = gen.vae.spatial_factor, gen.vae.temporal_factor
    video = video or gen.defaults
    shape = (noises, gen.vae.latent_channels, 1 + (video.frames - 1) // ft, video.height // fs, video.width // fs)
    z = torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(gen.device, gen.dtype)
    tt = torch.full((noises,), t * 1000.0, device=gen.device, dtype=gen.dtype)
    gaps = []
    for a, b in pairs:
        pictures = []
        for caption in (a, b):
            text = gen.encode_prompts([caption]).expand(noises, -1, -1)  # [N, L, D]
            x0 = z.float() - t * gen.dit(z, tt, text, None, None, None).float()  # [N, C, f, h, w]
            pictures.append(gen.vae.decode(x0.to(z.dtype)).float())  # [N, 3, F, H, W]
        gaps.append(float((pictures[0] - pictures[1]).pow(2).mean().sqrt()))
    return sum(gaps) / len(gaps)


def caption_word(caption: str, words: list[str] | set[str] | dict[str, str]) -> str | None:
    """The one word of `words` a caption contains ("... slides to the left ..." -> "left"), None if none or several."""
    found = {w for w in re.findall(r"[a-z]+", caption.lower()) if w in words}
    return found.pop() if len(found) == 1 else None


def explained_share(clips: Tensor, labels: list[str]) -> float:
    """Share of the clips' pixel variance that the mean clip of each label explains (ANOVA's eta squared).

    clips [N, ...] float; labels: one per clip. 1 = the label fixes the clip, 0 = every label's mean clip
    is the grand mean. This is what a flow model's clean-latent estimate can take from a caption word at
    t ~ 1, where z_t shows nothing: the MSE-optimal estimate is the mean clip of the caption, so a word
    whose mean clip is the grand mean (a background of random phase, orientation and colours) gives
    the loss nothing to read it for there (docs/bench_mini.md, tenth round).
    """
    if clips.shape[0] != len(labels) or clips.shape[0] < 2:
        raise ValueError(f"need one label per clip and >= 2 clips, got {clips.shape[0]} clips, {len(labels)} labels")
    x = clips.double().flatten(1)  # [N, P]
    grand = x.mean(0)
    total = (x - grand).pow(2).sum()
    if total == 0:
        raise ValueError("the clips are all identical: no variance to explain")
    between = x.new_zeros(())
    for label in sorted(set(labels)):
        idx = torch.tensor([i for i, lab in enumerate(labels) if lab == label])
        between = between + len(idx) * (x[idx].mean(0) - grand).pow(2).sum()
    return float(between / total)
