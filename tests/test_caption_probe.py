"""The caption probe: a model that ignores the text scores exactly 0, one that uses the word scores > 0."""

from __future__ import annotations

import math

import pytest
import torch

from saber_pl.eval.caption_probe import (BACKGROUND_SWAPS, DIRECTION_SWAPS, caption_reliance, noise_layout_gap,
                                         swap_words)
from saber_pl.generate import Generator, VideoSpec, model_limits
from saber_pl.wan import ModelConfig, build_components

SHORT = ["moves up", "moves down", "goes left", "goes right"]  # within tiny's 16 byte tokens
CAPTIONS = ["an object slides to the left on a striped background", "a thing moves up on a plain background",
            "a shape moves down on a checkered background", "an item slides to the right on a gradient background"]


def _generator() -> Generator:
    model = ModelConfig(scale="tiny", init="t2v")
    comps = build_components(model)
    return Generator(comps.transformer, comps.vae, comps.text_encoder, model_limits(model))


def _clips(n: int) -> torch.Tensor:
    return torch.rand(n, 3, 5, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1  # [N, 3, F, H, W]


def test_swap_words_swaps_whole_words_at_once():
    assert swap_words(CAPTIONS[0], DIRECTION_SWAPS) == "an object slides to the right on a striped background"
    assert swap_words("moves up and to the left, upwards", DIRECTION_SWAPS) == "moves down and to the right, upwards"
    assert swap_words(CAPTIONS[2], BACKGROUND_SWAPS) == "a shape moves down on a plain background"
    assert swap_words("a cat", DIRECTION_SWAPS) == "a cat"


def test_a_model_that_ignores_the_text_scores_zero():
    gen = _generator()
    assert all(v != 0 for v in caption_reliance(gen, _clips(4), SHORT, DIRECTION_SWAPS))  # random: it reads
    for block in gen.dit.wan.blocks:  # the cross-attention's output projection to zero: text has no path in
        torch.nn.init.zeros_(block.attn2.to_out[0].weight)
        torch.nn.init.zeros_(block.attn2.to_out[0].bias)
    out = caption_reliance(gen, _clips(4), SHORT, DIRECTION_SWAPS)
    assert out == [0.0, 0.0, 0.0, 0.0]
    assert math.isnan(caption_reliance(gen, _clips(1), ["a cat"], DIRECTION_SWAPS)[0])  # nothing to swap


class _ReadsText:
    """A DiT stand-in that predicts the true velocity exactly when given the true caption's embedding."""

    def __init__(self, gen: Generator, z0: torch.Tensor, noise: torch.Tensor, true_text: torch.Tensor) -> None:
        self.z0, self.noise, self.true_text = z0, noise, true_text

    def __call__(self, z_t, t, text, *_):  # [B, C, f, h, w]
        err = (text - self.true_text).abs().flatten(1).mean(1)  # [B], 0 for the true caption
        return self.noise - self.z0 + 0.1 + err[:, None, None, None, None]  # a loss of 0.01 at best


def test_a_model_that_uses_the_word_scores_above_zero():
    gen = _generator()
    short = SHORT
    clips = _clips(4)
    z0 = gen.vae.encode(clips)
    noise = torch.randn(z0.shape, generator=torch.Generator().manual_seed(0))
    gen.dit = _ReadsText(gen, z0, noise, gen.encode_prompts(short))
    out = caption_reliance(gen, clips, short, DIRECTION_SWAPS, ts=(0.5,))
    assert all(v > 0.1 for v in out), out


def test_mismatched_inputs_are_refused():
    with pytest.raises(ValueError, match="2 clips but 4 captions"):
        caption_reliance(_generator(), _clips(2), CAPTIONS, DIRECTION_SWAPS)


def test_noise_layout_gap_is_zero_for_a_model_that_ignores_the_text():
    """At t ~ 1 (where the sampler places the subject): a random DiT's picture moves with the word; with
    the cross-attention's output at zero the text has no path in and the gap is exactly 0."""
    gen = _generator()
    video = VideoSpec(height=32, width=32, frames=5, fps=8.0)
    assert noise_layout_gap(gen, SHORT, DIRECTION_SWAPS, noises=2, video=video) > 1e-4
    for block in gen.dit.wan.blocks:
        torch.nn.init.zeros_(block.attn2.to_out[0].weight)
        torch.nn.init.zeros_(block.attn2.to_out[0].bias)
    assert noise_layout_gap(gen, SHORT, DIRECTION_SWAPS, noises=2, video=video) == 0.0
    with pytest.raises(ValueError, match="no caption has a word to swap"):
        noise_layout_gap(gen, ["a cat"], DIRECTION_SWAPS, video=video)


def test_explained_share_is_one_when_the_word_fixes_the_clip_and_zero_for_random_phase() -> None:
    """eta squared of a caption word: a word that picks the clip explains all of it; stripes of random
    phase under two words explain ~nothing (their mean clips are both flat), though they are the clips."""
    from saber_pl.eval.caption_probe import caption_word, explained_share

    g = torch.Generator().manual_seed(0)
    a, b = torch.rand(3, 8, 8, generator=g), torch.rand(3, 8, 8, generator=g)
    assert explained_share(torch.stack([a, a, b, b]), ["left", "left", "right", "right"]) == pytest.approx(1.0)
    x = torch.arange(32.0)
    phases = torch.rand(400, generator=g) * 2 * torch.pi
    stripes = torch.sin(x[None, :] * 2 * torch.pi / 8 + phases[:, None])[:, None, :].expand(400, 32, 32)  # [N, H, W]
    labels = ["striped" if i % 2 else "plain" for i in range(400)]
    assert explained_share(stripes, labels) < 0.02
    shifted = stripes + torch.tensor([0.5 if lab == "striped" else 0.0 for lab in labels])[:, None, None]
    assert explained_share(shifted, labels) > 0.1  # a word that moves the mean clip does explain it
    assert caption_word("an object slides to the left on a striped background", {"left": 0, "right": 0}) == "left"
    assert caption_word("left and right", {"left": 0, "right": 0}) is None
    with pytest.raises(ValueError, match="one label per clip"):
        explained_share(stripes, labels[:-1])
