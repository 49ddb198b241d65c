"""A word-level hashing tokenizer for the random umT5 of the tiny/mini scales.

Wan's umT5 tokenizer (SentencePiece) gives common English words one token each; the small scales
cannot load it (nothing is downloaded), and a byte tokenizer spells every word out, so a random
frozen 2-layer umT5 hands the DiT a direction word only as letters shared with other words ("left"
shares its letters with "slides", "object", "figure"). This tokenizer gives each word one id, as
SentencePiece would, without a vocabulary file: the id is a stable hash of the lower-cased word
(CRC-32, not Python's salted `hash`), so any prompt tokenizes and every process agrees. Written by
hand because neither transformers nor tokenizers has a vocabulary-free word model (`WordLevel`
needs a fixed vocabulary and maps every other word to one unknown id).
"""

from __future__ import annotations

import re
import zlib
from typing import Any

from transformers import PreTrainedTokenizer

WORD_VOCAB = 4096  # ids of the word tokenizer: the 40 caption tokens never collide (tests/test_tokenizer.py)
WORD = re.compile(r"[a-z0-9]+|[^\sa-z0-9]")  # words and digits, each other non-space character alone


class WordHashTokenizer(PreTrainedTokenizer):
    """T5-style ids (0 pad, 1 eos, 2 unk), then `vocab_size - 3` hash buckets for words; eos appended."""

    model_input_names = ["input_ids", "attention_mask"]
    SPECIAL = ("<pad>", "</s>", "<unk>")

    def __init__(self, vocab_size: int = WORD_VOCAB, **kwargs: Any) -> None:
        if vocab_size < 16:
            raise ValueError(f"vocab_size must be >= 16, got {vocab_size}")
        self._size = int(vocab_size)
        super().__init__(pad_token="<pad>", eos_token="</s>", unk_token="<unk>", **kwargs)

    @property
    def vocab_size(self) -> int:
        return self._size

    def get_vocab(self) -> dict[str, int]:
        # hash buckets have no single word; only the special tokens have names
        return {t: i for i, t in enumerate(self.SPECIAL)}

    def _tokenize(self, text: str, **kwargs: Any) -> list[str]:
        return WORD.findall(text.lower())

    def _convert_token_to_id(self, token: str) -> int:
        if token in self.SPECIAL:
            return self.SPECIAL.index(token)
        return len(self.SPECIAL) + zlib.crc32(token.encode("utf-8")) % (self._size - len(self.SPECIAL))

    def _convert_id_to_token(self, index: int) -> str:
        return self.SPECIAL[index] if index < len(self.SPECIAL) else f"<word_{index}>"

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        return " ".join(tokens)

    def build_inputs_with_special_tokens(self, token_ids_0: list[int],
                                         token_ids_1: list[int] | None = None) -> list[int]:
        ids = token_ids_0 + [self.eos_token_id]
        return ids if token_ids_1 is None else ids + token_ids_1 + [self.eos_token_id]

    def get_special_tokens_mask(self, token_ids_0: list[int], token_ids_1: list[int] | None = None,
                                already_has_special_tokens: bool = False) -> list[int]:
        if already_has_special_tokens:
            return [int(i < len(self.SPECIAL)) for i in token_ids_0 + (token_ids_1 or [])]
        mask = [0] * len(token_ids_0) + [1]
        return mask if token_ids_1 is None else mask + [0] * len(token_ids_1) + [1]

    def save_vocabulary(self, save_directory: str, filename_prefix: str | None = None) -> tuple[str, ...]:
        return ()  # no vocabulary file: the hash is the vocabulary
