"""The user-facing model: GPT2.from_pretrained, logits, generate, stream, score."""
from __future__ import annotations

import os
from typing import Iterator

import numpy as np

from . import _core
from .config import GPT2Config
from .generation import (GenerationResult, ScoreResult, TextStream, TokenLogprob, cut_at_stop, sampling_dict,
                         speculation_dict, validate_options)
from .loading import expected_shapes, load_checkpoint
from .quantize import KV_CACHE_DTYPES, check_dtype, convert_tensors
from .tokenizer import GPT2Tokenizer

_EARLY_STOPPING = {False: 0, True: 1, "never": 2}


def _kv_cache_dtype(kv_cache_dtype: str | None, dtype: str) -> str:
    if kv_cache_dtype is None:
        return "fp32" if dtype == "fp32" else "fp16"
    if kv_cache_dtype not in KV_CACHE_DTYPES:
        raise ValueError(f"kv_cache_dtype must be 'fp32' or 'fp16', got {kv_cache_dtype!r}")
    return kv_cache_dtype


class GPT2:
    """A GPT-2 checkpoint loaded into the C++ core. Safe to share between threads."""

    def __init__(self, config: GPT2Config, tensors: dict, tokenizer: GPT2Tokenizer | None = None,
                 threads: int | None = None, name: str = "", metadata: dict | None = None, dtype: str = "fp32",
                 kv_cache_dtype: str | None = None):
        self.config = config
        self.tokenizer = tokenizer
        self.name = name
        self.metadata = metadata or {}
        self.dtype = check_dtype(dtype)
        self.kv_cache_dtype = _kv_cache_dtype(kv_cache_dtype, self.dtype)
        self._tensors = tensors
        self._core = _core.Model({**config.core_dict(), "kv_cache_dtype": self.kv_cache_dtype}, tensors)
        self.threads = threads

    # ---- loading -------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, name_or_path: str, threads: int | None = None, dtype: str | None = None,
                        prefix_cache_tokens: int = 0, kv_cache_dtype: str | None = None) -> "GPT2":
        """A local directory, a bundled model name (see gptcpp.bundled_models()), or a Hugging Face hub id.

        dtype: the format of the large weight matrices, "fp32", "fp16", "bf16", "int8" or "int4" (converted
        at load into the kernels' layout; see gptcpp.quantize). None (the default) means fp32 for a
        Hugging Face checkpoint and the stored format for one written by `gptcpp quantize`, which loads
        without conversion; asking such a checkpoint for another format is an error.
        prefix_cache_tokens: keep the KV cache of recent prompts, up to this many tokens in all (least
        recently used evicted), so that prompts sharing a prefix skip its prefill; results are bit-identical.
        kv_cache_dtype: how the KV cache stores keys and values, "fp32" or "fp16" (half the bytes that attention
        reads each step: a batch of 16 sequences of gpt2 at 72 positions reads 85 MB of them in fp32). None (the
        default) means fp32 for fp32 weights, which keeps their logits exact, and fp16 for the other formats,
        as llama.cpp's default F16 cache does."""
        _kv_cache_dtype(kv_cache_dtype, "fp32")
        if dtype is not None:
            check_dtype(dtype)
        directory, cfg, tensors, metadata = load_checkpoint(str(name_or_path))
        stored = metadata.get("gptcpp.dtype")
        if stored is not None:
            if dtype not in (None, stored):
                raise ValueError(f"{name_or_path} holds {stored} weights written by gptcpp quantize; load it with "
                                 f"dtype={stored!r} (or none), or quantize the original checkpoint to {dtype}")
            dtype = stored
        else:
            dtype = dtype or "fp32"
            tensors = convert_tensors(tensors, dtype, release=tensors.release)
        try:
            tok = GPT2Tokenizer.from_directory(directory)
        except FileNotFoundError:
            tok = None
        if tok is not None and tok.vocab_size > cfg.vocab_size:
            raise ValueError(f"the tokenizer in {directory} has {tok.vocab_size} tokens but the model's vocab_size "
                             f"is {cfg.vocab_size}")
        model = cls(cfg, tensors, tok, threads=threads, name=str(name_or_path), metadata=metadata, dtype=dtype,
                    kv_cache_dtype=kv_cache_dtype)
        model.enable_prefix_cache(prefix_cache_tokens)
        return model

    def enable_prefix_cache(self, tokens: int) -> None:
        """Keeps the KV cache of recent prompt prefixes within `tokens` cached tokens (0 turns it off)."""
        if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 0:
            raise ValueError(f"prefix_cache_tokens must be a non-negative integer, got {tokens!r}")
        self._core.enable_prefix_cache(tokens)

    @property
    def prefix_cache_tokens(self) -> int:
        """Tokens currently held by the prefix cache."""
        return self._core.prefix_cache_tokens

    @property
    def threads(self) -> int:
        return self._core.threads or (os.cpu_count() or 1)

    @threads.setter
    def threads(self, n: int | None) -> None:
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
            raise ValueError(f"threads must be a positive integer, got {n!r}")
        self._core.threads = n or 0

    @property
    def isa(self) -> str:
        """The instruction-set level the kernels run with."""
        return _core.isa()

    def num_parameters(self) -> int:
        """Parameters of the checkpoint (as stored, formats pad and add scales)."""
        return int(sum(np.prod(s) for s in expected_shapes(self.config).values()))

    def weight_bytes(self) -> int:
        """Bytes of weights one decoding step reads (all tensors as stored)."""
        return int(sum(t.nbytes for t in self._tensors.values()))

    # ---- tokens ---------------------------------------------------------------------------------------
    def _require_tokenizer(self) -> GPT2Tokenizer:
        if self.tokenizer is None:
            raise ValueError("this model has no tokenizer files; pass token ids instead of text")
        return self.tokenizer

    def _check_ids(self, ids) -> list[int]:
        if isinstance(ids, np.ndarray) and ids.dtype.kind not in "iu":
            raise ValueError(f"token ids must be integers, got an array of {ids.dtype}")
        try:
            items = list(ids)
        except TypeError:
            raise ValueError(f"token ids must be a sequence of integers, got {ids!r}") from None
        for t in items:
            if isinstance(t, bool) or not isinstance(t, (int, np.integer)):
                raise ValueError(f"token ids must be integers, got {t!r}")
        out = [int(t) for t in items]
        for t in out:
            if not 0 <= t < self.config.vocab_size:
                raise ValueError(f"token id {t} is outside the vocabulary (0..{self.config.vocab_size - 1})")
        return out

    def _prompt_ids(self, prompt) -> list[int]:
        if isinstance(prompt, str):
            ids = self._require_tokenizer().encode(prompt)
        else:
            ids = self._check_ids(prompt)
        if not ids:  # an empty prompt starts from <|endoftext|>, as GPT-2 was trained
            bos = self.config.bos_token_id if self.config.bos_token_id is not None else (self.config.eos_token_ids or [0])[0]
            ids = [bos]
        if len(ids) > self.config.n_positions:
            raise ValueError(f"the prompt has {len(ids)} tokens, more than the model's context of "
                             f"{self.config.n_positions} (n_positions)")
        return ids

    def _decode(self, ids, skip_special_tokens=True) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens) if self.tokenizer else ""

    # ---- raw forward ------------------------------------------------------------------------------------
    def logits(self, token_ids) -> np.ndarray:
        """float32 logits [len(token_ids), vocab] of a whole sequence."""
        ids = self._check_ids(token_ids)
        if not ids:
            raise ValueError("token_ids is empty")
        if len(ids) > self.config.n_positions:
            raise ValueError(f"{len(ids)} tokens exceed the model's context of {self.config.n_positions} (n_positions)")
        cache = self._core.new_cache(len(ids))
        return self._core.forward([cache], [np.asarray(ids, dtype=np.int32)], True)[0]

    def hidden_states(self, token_ids) -> np.ndarray:
        """The final layer-normed hidden states [len(token_ids), n_embd] (what the LM head reads)."""
        ids = self._check_ids(token_ids)
        if not ids or len(ids) > self.config.n_positions:
            raise ValueError(f"token_ids must hold 1..{self.config.n_positions} tokens")
        cache = self._core.new_cache(len(ids))
        return self._core.forward([cache], [np.asarray(ids, dtype=np.int32)], True, True)[1]

    def new_cache(self, capacity: int | None = None):
        """A KV cache for incremental decoding with forward()."""
        return self._core.new_cache(capacity or self.config.n_positions)

    def forward(self, cache, token_ids, all_logits: bool = True) -> np.ndarray:
        """Appends token_ids to cache and returns their logits (all rows, or only the last)."""
        ids = np.asarray(self._check_ids(token_ids), dtype=np.int32)
        return self._core.forward([cache], [ids], all_logits)[0]

    # ---- generation -------------------------------------------------------------------------------------
    @staticmethod
    def _is_batch(prompt) -> bool:
        return isinstance(prompt, (list, tuple)) and len(prompt) > 0 and not isinstance(prompt[0], (int, np.integer))

    def generate(self, prompt, **options):
        """Generates from a prompt (text or token ids) or a list of them, decoded together as one batch.

        One prompt gives a GenerationResult (a list of them when num_return_sequences > 1); a list of prompts
        gives a list in the same order."""
        batch = self._is_batch(prompt)
        prompts = list(prompt) if batch else [prompt]
        o = validate_options(options, self.config.vocab_size, self.config.eos_token_ids)
        ids = [self._prompt_ids(p) for p in prompts]
        if o["num_beams"] > 1:
            results = [self._beam_search(p, o) for p in ids]
        else:
            run = _Run(self, ids, o)
            for _ in run.events():
                pass
            results = run.results()
        if o["num_return_sequences"] == 1:
            results = [r[0] for r in results]
        return results if batch else results[0]

    def stream(self, prompt, **options) -> Iterator[str]:
        """Yields text pieces as tokens are produced; they never split a character, and joined they equal
        generate(prompt, **options).text."""
        if self._is_batch(prompt):
            raise ValueError("stream() takes one prompt")
        o = validate_options(options, self.config.vocab_size, self.config.eos_token_ids)
        if o["num_beams"] > 1 or o["num_return_sequences"] > 1:
            raise ValueError("stream() supports num_beams=1 and num_return_sequences=1")
        run = _Run(self, [self._prompt_ids(prompt)], o)
        for _, piece in run.events():
            if piece:
                yield piece

    def _beam_search(self, ids: list[int], o: dict) -> list[GenerationResult]:
        opts = sampling_dict(o)
        if o["do_sample"]:
            opts["min_tokens_to_keep"] = len(o["eos_token_id"]) + 1
        hyps = _core.beam_search(self._core, ids, opts, o["num_beams"], o["max_new_tokens"], float(o["length_penalty"]),
                                 _EARLY_STOPPING[o["early_stopping"]], o["num_return_sequences"])
        out = []
        eos = set(o["eos_token_id"])
        for tokens, score in hyps:
            text = self._decode(tokens)
            finish = "eos" if tokens and tokens[-1] in eos else "length"
            text, cut = cut_at_stop(text, o["stop"])
            out.append(GenerationResult(text=text, token_ids=list(tokens), finish_reason="stop" if cut else finish,
                                        prompt_token_ids=ids, score=float(score)))
        return out

    # ---- scoring ----------------------------------------------------------------------------------------
    def score(self, text_or_texts, stride: int | None = None, chunk: int = 256, progress=None):
        """Per-token log-probabilities, total log-likelihood and perplexity of a text (or list of texts).

        Token i is scored given tokens 0..i-1 (the first token is not scored), as transformers' loss with
        labels=input_ids. A text longer than the context is scored with a sliding window that moves by
        `stride` tokens (default half the context), each token scored once with as much context as fits.
        progress, if given, is called with the number of tokens done so far."""
        if isinstance(text_or_texts, (list, tuple)) and text_or_texts and not isinstance(text_or_texts[0], (int, np.integer)):
            return [self.score(t, stride=stride, chunk=chunk, progress=progress) for t in text_or_texts]
        if isinstance(text_or_texts, str):
            ids = self._require_tokenizer().encode(text_or_texts)
        else:
            ids = self._check_ids(text_or_texts)
        if not ids:
            raise ValueError("nothing to score: the text is empty")
        n_ctx = self.config.n_positions
        stride = stride or max(1, n_ctx // 2)
        if not 1 <= stride <= n_ctx:
            raise ValueError(f"stride must be in 1..{n_ctx}")
        logprobs: list[float | None] = [None] * len(ids)
        begin, scored_to = 0, 1  # tokens before scored_to already have their score
        while True:
            end = min(begin + n_ctx, len(ids))
            window = ids[begin:end]
            cache = self._core.new_cache(len(window))
            for c0 in range(0, len(window), chunk):
                part = np.asarray(window[c0:c0 + chunk], dtype=np.int32)
                logits = self._core.forward([cache], [part], True)[0]
                mx = logits.max(axis=1, keepdims=True)
                lse = (mx + np.log(np.exp(logits - mx).sum(axis=1, keepdims=True)))[:, 0]
                for r in range(len(part)):
                    target = begin + c0 + r + 1  # the token this row predicts
                    if scored_to <= target < end:
                        logprobs[target] = float(logits[r, ids[target]] - lse[r])
            scored_to = end
            if progress is not None:
                progress(end)
            if end == len(ids):
                break
            begin += stride
        vals = [v for v in logprobs if v is not None]
        return ScoreResult(token_ids=ids, token_logprobs=logprobs, total_logprob=float(sum(vals)), n_scored=len(vals))


class _Seq:
    __slots__ = ("prompt_idx", "prompt", "tokens", "logprobs", "finish", "text", "proposed", "accepted")

    def __init__(self, prompt_idx, prompt, text):
        self.prompt_idx, self.prompt, self.text = prompt_idx, prompt, text
        self.tokens, self.logprobs, self.finish = [], None, None
        self.proposed = self.accepted = 0


class _Run:
    """One batched decoding run: prompts x num_return_sequences sequences in one C++ Decoder."""

    def __init__(self, model: GPT2, prompts: list[list[int]], o: dict):
        self.model, self.o = model, o
        draft = o["assistant_model"]
        if draft is not None:
            if not isinstance(draft, GPT2):
                raise ValueError("assistant_model must be a gptcpp.GPT2")
            if draft.config.vocab_size != model.config.vocab_size:
                raise ValueError(f"assistant_model has vocab_size {draft.config.vocab_size}, the model "
                                 f"{model.config.vocab_size}: they must share a vocabulary")
        self.dec = _core.Decoder(model._core, draft._core if draft is not None else None)
        spec = speculation_dict(o)
        opts = sampling_dict(o)
        logprobs = -1 if o["logprobs"] is None else o["logprobs"]
        self.order, self.seqs = [], {}
        for pi, ids in enumerate(prompts):
            for r in range(o["num_return_sequences"]):
                sid = self.dec.add(ids, opts, o["max_new_tokens"], logprobs, r, spec)
                seq = _Seq(pi, ids, TextStream(model.tokenizer, o["stop"]) if model.tokenizer else None)
                if logprobs >= 0:
                    seq.logprobs = []
                self.seqs[sid] = seq
                self.order.append(sid)

    def events(self):
        """Runs steps until every sequence ends; yields (sequence id, new text piece) per produced token."""
        tok = self.model.tokenizer
        while self.dec.live:
            for sid, token, finish, lp, proposed, accepted in self.dec.step():
                seq = self.seqs[sid]
                if seq.finish is not None:
                    continue
                seq.tokens.append(token)
                seq.proposed, seq.accepted = proposed, accepted
                if lp is not None:
                    chosen, top = lp
                    name = tok.id_to_token if tok else (lambda i: None)
                    seq.logprobs.append(TokenLogprob(token, name(token), chosen, [(t, name(t), v) for t, v in top]))
                piece = ""
                if seq.text is not None:
                    piece = seq.text.push(token, finish is not None)
                    if seq.text.stopped:
                        if finish is None:  # the C++ step would go on: a stop string ended it here
                            self.dec.cancel(sid)
                        finish = "stop"
                if finish is not None:
                    seq.finish = finish
                yield sid, piece

    def results(self) -> list[list[GenerationResult]]:
        out: list[list[GenerationResult]] = [[] for _ in range(1 + max((s.prompt_idx for s in self.seqs.values()), default=0))]
        for sid in self.order:
            s = self.seqs[sid]
            text = s.text.text() if s.text else ""
            out[s.prompt_idx].append(GenerationResult(text=text, token_ids=s.tokens, finish_reason=s.finish or "length",
                                                      prompt_token_ids=s.prompt, logprobs=s.logprobs,
                                                      proposed_tokens=s.proposed, accepted_tokens=s.accepted))
        return out
