"""Figures of the bundled models for the README: held-out perplexity per weight format, and speculative
decoding with the trained draft (acceptance and speed-up) on held-out text.

    python benchmarks/bundled_report.py [--windows 64] [--threads 2]
"""
import argparse
import os
import sysconfig
import time
import zlib

import numpy as np

import gptcpp


def heldout_ids(tok):
    root = sysconfig.get_paths()["stdlib"]
    ids = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in ("site-packages", "__pycache__"))
        for fn in sorted(filenames):
            rel = os.path.relpath(os.path.join(dirpath, fn), root)
            if fn.endswith(".py") and zlib.crc32(rel.encode()) % 20 == 0:
                with open(os.path.join(dirpath, fn), encoding="utf-8", errors="replace") as f:
                    ids += tok.encode(f.read()) + [50256]
    return ids


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--windows", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    ref = gptcpp.GPT2.from_pretrained("stdlib-gpt2", threads=args.threads)
    ids = heldout_ids(ref.tokenizer)
    n_win = (len(ids) - 1) // 256
    picks = np.linspace(0, n_win - 1, args.windows).astype(int)
    windows = [ids[i * 256:(i + 1) * 256] for i in picks]
    base = None
    print(f"held-out: {len(ids)} tokens; {args.windows} windows of 256 spread evenly")
    for dtype in ("fp32", "fp16", "bf16", "int8", "int4"):
        m = ref if dtype == "fp32" else gptcpp.GPT2.from_pretrained("stdlib-gpt2", threads=args.threads, dtype=dtype)
        lp = n = 0
        errs = []
        for w in windows:
            s = m.score(w)
            lp += s.total_logprob
            n += s.n_scored
            if dtype != "fp32":
                a, b = ref.logits(w), m.logits(w)
                errs.append((((b - a) ** 2).mean(), (a ** 2).mean()))
        ppl = float(np.exp(-lp / n))
        base = base or ppl
        err = "" if not errs else f", RMS logit error {np.sqrt(sum(e for e, _ in errs) / sum(r for _, r in errs)):.4%}"
        print(f"{dtype}: perplexity {ppl:.3f} ({(ppl - base) / base:+.3%}){err}")
    draft = gptcpp.GPT2.from_pretrained("stdlib-gpt2-draft", threads=args.threads)
    prompts = [ref.tokenizer.decode(w[:128]) for w in windows[::8]]
    for label, kw in (("plain", {}), ("draft model", dict(assistant_model=draft)),
                      ("prompt lookup", dict(prompt_lookup_num_tokens=4))):
        t0 = time.perf_counter()
        res = [ref.generate(p, max_new_tokens=100, eos_token_id=[], **kw) for p in prompts]
        dt = time.perf_counter() - t0
        prop, acc = sum(r.proposed_tokens for r in res), sum(r.accepted_tokens for r in res)
        tok = sum(len(r.token_ids) for r in res)
        rate = f", acceptance {acc}/{prop} = {acc / prop:.0%}" if prop else ""
        print(f"{label}: {tok / dt:.0f} tok/s{rate}")


if __name__ == "__main__":
    main()
