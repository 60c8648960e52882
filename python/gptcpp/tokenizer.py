"""GPT-2's byte-level BPE through the `tokenizers` library, from tokenizer.json or vocab.json + merges.txt."""
from __future__ import annotations

import os

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

ENDOFTEXT = "<|endoftext|>"


def tokenizer_from_vocab(vocab_file: str, merges_file: str) -> Tokenizer:
    """The same tokenizer as transformers' GPT2TokenizerFast built from GPT-2's vocab.json and merges.txt."""
    tok = Tokenizer(models.BPE.from_file(vocab_file, merges_file))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    if tok.token_to_id(ENDOFTEXT) is not None:
        tok.add_special_tokens([ENDOFTEXT])
    return tok


class GPT2Tokenizer:
    """Text <-> token ids. decode() drops nothing by default: <|endoftext|> in the ids shows in the text."""

    def __init__(self, tokenizer: Tokenizer):
        self.backend = tokenizer
        self.eos_token_id = tokenizer.token_to_id(ENDOFTEXT)

    @classmethod
    def from_directory(cls, directory: str) -> "GPT2Tokenizer":
        tj = os.path.join(directory, "tokenizer.json")
        if os.path.isfile(tj):
            try:
                return cls(Tokenizer.from_file(tj))
            except Exception as e:
                raise ValueError(f"{tj} is not a valid tokenizer file: {e}") from None
        vocab, merges = os.path.join(directory, "vocab.json"), os.path.join(directory, "merges.txt")
        if os.path.isfile(vocab) and os.path.isfile(merges):
            try:
                return cls(tokenizer_from_vocab(vocab, merges))
            except Exception as e:
                raise ValueError(f"{vocab} / {merges} do not make a valid BPE tokenizer: {e}") from None
        raise FileNotFoundError(f"no tokenizer.json (or vocab.json + merges.txt) in {directory}")

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self.backend.encode(text, add_special_tokens=False).ids

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def id_to_token(self, i: int) -> str | None:
        return self.backend.id_to_token(int(i))


class IncrementalDecoder:
    """Turns a growing list of token ids into text pieces that never split a character.

    Byte-level BPE can put half of a UTF-8 character in one token; until the rest arrives the decoded text
    ends in U+FFFD, and that tail is held back. The pieces joined equal decode(all ids).

    Byte-level decoding concatenates: once the text decoded so far ends in a whole character, it never
    changes, so it is kept and only the ids after it are decoded again: each push costs the length of the
    unfinished tail, not of the whole sequence."""

    def __init__(self, tokenizer: GPT2Tokenizer, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip = skip_special_tokens
        self.ids: list[int] = []
        self.emitted = 0  # characters of the full text already handed out
        self._stable_text = ""  # decode(ids[:_stable_ids]), which ends in a whole character
        self._stable_ids = 0

    def _tail(self) -> str:
        return self.tokenizer.decode(self.ids[self._stable_ids:], skip_special_tokens=self.skip)

    def text(self) -> str:
        return self._stable_text + self._tail()

    def push(self, token_id: int) -> str:
        """Adds a token; returns the newly completed text (possibly empty)."""
        self.ids.append(int(token_id))
        tail = self._tail()
        if not tail.endswith("\ufffd"):
            self._stable_text += tail
            self._stable_ids = len(self.ids)
            tail = ""
        text = self._stable_text + tail
        end = len(text)
        while end > self.emitted and text[end - 1] == "\ufffd":
            end -= 1
        piece = text[self.emitted:end]
        self.emitted = max(self.emitted, end)
        return piece

    def flush(self) -> str:
        """The rest of the text, incomplete characters included (at the end of generation)."""
        text = self.text()
        piece = text[self.emitted:]
        self.emitted = len(text)
        return piece
