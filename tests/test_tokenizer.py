"""The small scales' word tokenizer: one stable id per word, distinct for every caption word."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from saber_pl import synthetic
from saber_pl.tokenizer import WORD_VOCAB, WordHashTokenizer
from saber_pl.wan import ModelConfig, build_components, tokenize


def caption_words() -> set[str]:
    """Every word the procedural captions can use (all motions, backgrounds, nouns, up to 4 subjects)."""
    cfg = synthetic.SyntheticConfig(motions=synthetic.MOTIONS, backgrounds=synthetic.BACKGROUNDS, max_subjects=4,
                                    two_subject_prob=0.5)
    tok = WordHashTokenizer()
    words: set[str] = set()
    for seed in range(400):
        words |= set(tok.tokenize(synthetic.sample_clip_spec(seed, cfg).caption))
    return words


def test_every_caption_word_has_its_own_id() -> None:
    words = caption_words()
    assert {"left", "right", "up", "down", "striped", "checkered", "plain", "gradient"} <= words
    ids = [WordHashTokenizer().convert_tokens_to_ids(w) for w in sorted(words)]
    assert len(set(ids)) == len(words), "two caption words share a hash bucket: raise WORD_VOCAB"
    assert all(3 <= i < WORD_VOCAB for i in ids)


def test_tokenize_pads_appends_eos_and_ignores_case() -> None:
    tok = WordHashTokenizer()
    ids, mask = tokenize(tok, ["An object slides to the LEFT.", "an object slides to the left ."], 12)
    assert ids.shape == (2, 12) and torch.equal(ids[0], ids[1])
    assert ids[0, 7].item() == tok.eos_token_id and mask[0].tolist() == [1] * 8 + [0] * 4
    assert (ids[0, 8:] == tok.pad_token_id).all()
    left, right = tokenize(tok, ["slides to the left", "slides to the right"], 8)[0]
    assert (left != right).sum().item() == 1  # one word, one token


def test_ids_do_not_depend_on_the_process() -> None:
    """Python's str hash is salted per process; the ids must not be (ranks, resume, generate)."""
    code = ("from saber_pl.tokenizer import WordHashTokenizer as T; "
            "print(T()('a shape moves up on a checkered background').input_ids)")
    outs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           env={**os.environ, "PYTHONHASHSEED": seed}).stdout for seed in ("1", "2")}
    assert len(outs) == 1
    assert outs.pop().strip() == str(WordHashTokenizer()("a shape moves up on a checkered background").input_ids)


def test_words_tokenizer_builds_a_umt5_that_tells_the_direction_words_apart() -> None:
    comps = build_components(ModelConfig(scale="tiny", init="random", tokenizer="words"))
    assert isinstance(comps.tokenizer, WordHashTokenizer)
    assert comps.text_encoder.encoder.config.vocab_size == WORD_VOCAB
    emb = comps.text_encoder.encode(*comps.text_encoder.tokenize(["a shape slides to the left on a plain background",
                                                   "a shape slides to the right on a plain background"]))  # [2, L, D]
    diff = (emb[0] - emb[1]).abs().sum(-1).numpy()  # [L]
    assert diff[5] > 0 and np.isfinite(diff).all()


@pytest.mark.parametrize("scale", ["1.3B", "14B"])
def test_words_tokenizer_is_refused_where_umt5_is_pretrained(scale: str) -> None:
    with pytest.raises(ValueError, match="tokenizer=words is for the random umT5"):
        ModelConfig(scale=scale, tokenizer="words")


def test_unknown_tokenizer_names_the_field() -> None:
    with pytest.raises(ValueError, match="tokenizer must be 'bytes' or 'words'"):
        ModelConfig(scale="mini", init="random", tokenizer="sentencepiece")  # type: ignore[arg-type]
