"""Generation options (named as in transformers' generate()), their validation, and result types."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Sequence

from .tokenizer import IncrementalDecoder

# option name -> default. top_k defaults to 50 as in transformers' GenerationConfig.
DEFAULTS = {
    "max_new_tokens": 20, "min_new_tokens": 0, "do_sample": False, "temperature": 1.0, "top_k": 50,
    "top_p": 1.0, "min_p": None, "typical_p": 1.0, "repetition_penalty": 1.0, "presence_penalty": 0.0,
    "frequency_penalty": 0.0, "no_repeat_ngram_size": 0, "num_beams": 1, "length_penalty": 1.0,
    "early_stopping": False, "num_return_sequences": 1, "eos_token_id": None, "bad_words_ids": None,
    "logit_bias": None, "stop": None, "seed": None, "logprobs": None,
    "assistant_model": None, "num_assistant_tokens": 5, "num_assistant_tokens_schedule": "heuristic",
    "prompt_lookup_num_tokens": None, "max_matching_ngram_size": 3,
}


@dataclass
class TokenLogprob:
    token_id: int
    token: str
    logprob: float
    top_logprobs: list[tuple[int, str, float]] = field(default_factory=list)


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]
    finish_reason: str  # "length", "stop" or "eos"
    prompt_token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] | None = None
    score: float | None = None  # beam search: the hypothesis' length-penalised score
    proposed_tokens: int = 0  # speculative decoding: tokens proposed for this sequence
    accepted_tokens: int = 0  # ... and accepted by the model


@dataclass
class ScoreResult:
    token_ids: list[int]
    token_logprobs: list[float | None]  # None for the first token, which nothing predicts
    total_logprob: float
    n_scored: int

    @property
    def perplexity(self) -> float:
        import math
        return math.exp(-self.total_logprob / self.n_scored) if self.n_scored else float("nan")


def _number(name, v, lo=None, hi=None, lo_open=False, hi_open=False, integer=False):
    ok_type = (int,) if integer else (int, float)
    if isinstance(v, bool) or not isinstance(v, ok_type):
        raise ValueError(f"{name} must be {'an integer' if integer else 'a number'}, got {v!r}")
    if v != v:
        raise ValueError(f"{name} must not be NaN")
    if lo is not None and (v <= lo if lo_open else v < lo):
        raise ValueError(f"{name} must be {'>' if lo_open else '>='} {lo}, got {v!r}")
    if hi is not None and (v >= hi if hi_open else v > hi):
        raise ValueError(f"{name} must be {'<' if hi_open else '<='} {hi}, got {v!r}")
    return v


def validate_options(options: dict, vocab_size: int, default_eos: list[int]) -> dict:
    """Checks every option; returns a complete dict (defaults filled). Raises ValueError naming the option."""
    unknown = sorted(set(options) - set(DEFAULTS))
    if unknown:
        raise ValueError(f"unknown generation option(s): {', '.join(unknown)}")
    o = {**DEFAULTS, **options}
    _number("max_new_tokens", o["max_new_tokens"], lo=1, integer=True)
    _number("min_new_tokens", o["min_new_tokens"], lo=0, integer=True)
    if not isinstance(o["do_sample"], bool):
        raise ValueError(f"do_sample must be True or False, got {o['do_sample']!r}")
    _number("temperature", o["temperature"], lo=0)
    if o["top_k"] is None:
        o["top_k"] = 0
    _number("top_k", o["top_k"], lo=0, integer=True)
    _number("top_p", o["top_p"], lo=0, hi=1, lo_open=True)
    if o["min_p"] is not None:
        _number("min_p", o["min_p"], lo=0, hi=1)
    _number("typical_p", o["typical_p"], lo=0, hi=1, lo_open=True)
    _number("repetition_penalty", o["repetition_penalty"], lo=0, lo_open=True)
    _number("presence_penalty", o["presence_penalty"], lo=-2, hi=2)
    _number("frequency_penalty", o["frequency_penalty"], lo=-2, hi=2)
    _number("no_repeat_ngram_size", o["no_repeat_ngram_size"], lo=0, integer=True)
    _number("num_beams", o["num_beams"], lo=1, integer=True)
    _number("length_penalty", o["length_penalty"])
    if o["early_stopping"] not in (True, False, "never"):
        raise ValueError(f"early_stopping must be True, False or 'never', got {o['early_stopping']!r}")
    _number("num_return_sequences", o["num_return_sequences"], lo=1, integer=True)
    if o["temperature"] == 0 and o["do_sample"]:
        o["do_sample"] = False  # temperature 0 means greedy, as the OpenAI API defines it
    if not o["do_sample"] and o["num_return_sequences"] > o["num_beams"]:
        raise ValueError(f"num_return_sequences ({o['num_return_sequences']}) must be <= num_beams "
                         f"({o['num_beams']}) without sampling")
    if o["num_beams"] > 1 and o["num_return_sequences"] > o["num_beams"]:
        raise ValueError(f"num_return_sequences ({o['num_return_sequences']}) must be <= num_beams ({o['num_beams']})")

    def token_id(name, t):
        if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab_size:
            raise ValueError(f"{name}: token id {t!r} is outside the vocabulary (0..{vocab_size - 1})")
        return t

    eos = o["eos_token_id"]
    if eos is None:
        eos = list(default_eos)
    elif isinstance(eos, int) and not isinstance(eos, bool):
        eos = [eos]
    if not isinstance(eos, (list, tuple)):
        raise ValueError(f"eos_token_id must be an int or a list of ints, got {eos!r}")
    o["eos_token_id"] = [token_id("eos_token_id", t) for t in eos]
    bad = o["bad_words_ids"] or []
    if not isinstance(bad, (list, tuple)) or not all(isinstance(w, (list, tuple)) and w for w in bad):
        raise ValueError("bad_words_ids must be a list of non-empty lists of token ids")
    o["bad_words_ids"] = [[token_id("bad_words_ids", t) for t in w] for w in bad]
    bias = o["logit_bias"] or {}
    if not isinstance(bias, dict):
        raise ValueError("logit_bias must be a dict {token_id: bias}")
    o["logit_bias"] = [(token_id("logit_bias", int(k) if isinstance(k, str) and k.isdigit() else k),
                        float(_number("logit_bias", v, lo=-100, hi=100))) for k, v in bias.items()]
    stop = o["stop"]
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, (list, tuple)) or not all(isinstance(s, str) and s for s in stop):
        raise ValueError("stop must be a non-empty string or a list of non-empty strings")
    o["stop"] = list(stop)
    if o["seed"] is None:
        o["seed"] = int.from_bytes(os.urandom(8), "little") >> 1
    _number("seed", o["seed"], lo=0, hi=2**64 - 1, integer=True)
    _number("num_assistant_tokens", o["num_assistant_tokens"], lo=1, hi=64, integer=True)
    if o["num_assistant_tokens_schedule"] not in ("heuristic", "constant"):
        raise ValueError("num_assistant_tokens_schedule must be 'heuristic' or 'constant'")
    if o["prompt_lookup_num_tokens"] is not None:
        _number("prompt_lookup_num_tokens", o["prompt_lookup_num_tokens"], lo=1, hi=64, integer=True)
    _number("max_matching_ngram_size", o["max_matching_ngram_size"], lo=1, hi=16, integer=True)
    if o["assistant_model"] is not None and o["prompt_lookup_num_tokens"] is not None:
        raise ValueError("assistant_model and prompt_lookup_num_tokens cannot be combined")
    if (o["assistant_model"] is not None or o["prompt_lookup_num_tokens"] is not None) and o["num_beams"] > 1:
        raise ValueError("assistant_model / prompt_lookup_num_tokens work with num_beams=1")
    if o["logprobs"] is not None:
        if o["logprobs"] is True:
            o["logprobs"] = 0
        _number("logprobs", o["logprobs"], lo=0, hi=20, integer=True)
    return o


def speculation_dict(o: dict) -> dict:
    """How the C++ step proposes tokens for a sequence."""
    if o["assistant_model"] is not None:
        return {"mode": "draft", "num_tokens": int(o["num_assistant_tokens"]),
                "adaptive": o["num_assistant_tokens_schedule"] == "heuristic"}
    if o["prompt_lookup_num_tokens"] is not None:
        return {"mode": "prompt_lookup", "num_tokens": int(o["prompt_lookup_num_tokens"]), "adaptive": False,
                "max_ngram": int(o["max_matching_ngram_size"])}
    return {}


def sampling_dict(o: dict) -> dict:
    """The per-sequence options the C++ step takes."""
    return {
        "do_sample": o["do_sample"], "temperature": float(o["temperature"] or 1.0), "top_k": int(o["top_k"]),
        "top_p": float(o["top_p"]), "min_p": float(o["min_p"] or 0.0), "typical_p": float(o["typical_p"]),
        "repetition_penalty": float(o["repetition_penalty"]), "presence_penalty": float(o["presence_penalty"]),
        "frequency_penalty": float(o["frequency_penalty"]), "no_repeat_ngram_size": int(o["no_repeat_ngram_size"]),
        "bad_words_ids": o["bad_words_ids"], "logit_bias": o["logit_bias"], "min_new_tokens": int(o["min_new_tokens"]),
        "eos_token_ids": o["eos_token_id"], "seed": int(o["seed"]),
    }


def cut_at_stop(text: str, stops: Sequence[str]) -> tuple[str, bool]:
    """text up to the first stop string (excluded), and whether one was found."""
    cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


def held_back(text: str, stops: Sequence[str]) -> int:
    """Length of the longest tail of text that could still grow into a stop string."""
    best = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:k]):
                best = max(best, k)
                break
    return best


class TextStream:
    """A sequence's generated tokens -> text pieces, as generate(), stream() and the server hand them out.

    A piece never ends in half a character (held back until the rest arrives) nor in text that a stop
    string may still claim; once a stop string appears the text ends before it. Joined, the pieces equal
    text()."""

    def __init__(self, tokenizer, stops: Sequence[str]):
        self.decoder = IncrementalDecoder(tokenizer)
        self.stops = list(stops)
        self.emitted = 0  # characters handed out
        self.stopped = False

    def push(self, token: int, final: bool) -> str:
        """Adds a token; final: the sequence ends with it, so hand out everything."""
        self.decoder.push(token)
        text = self.decoder.text()
        if self.stops:
            # A stop string can only start in the part not yet handed out, less what was held back for it.
            start = max(0, self.emitted - max(len(s) for s in self.stops))
            cut_tail, self.stopped = cut_at_stop(text[start:], self.stops)
            if self.stopped:
                cut_text = text[:start] + cut_tail
                piece = cut_text[self.emitted:]
                self.emitted = max(self.emitted, len(cut_text))
                return piece
        end = len(text)
        if not final:
            while end > self.emitted and text[end - 1] == "\ufffd":
                end -= 1
            end -= held_back(text[:end], self.stops)
        if end <= self.emitted:
            return ""
        piece = text[self.emitted:end]
        self.emitted = end
        return piece

    def text(self) -> str:
        return cut_at_stop(self.decoder.text(), self.stops)[0]
