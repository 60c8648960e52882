"""The bundled trained models: loadable by name, scored as transformers scores them, and used where random
weights prove little (smaller formats' accuracy, speculative acceptance)."""
import json
import math
import os
import sysconfig
import zlib

import numpy as np
import pytest
import torch
import transformers

import gptcpp
from gptcpp.loading import resolve_model_dir

MAIN, DRAFT = "stdlib-gpt2", "stdlib-gpt2-draft"


def heldout_text(max_chars=6000):
    """Text of the held-out split the training script used (files whose path hash is divisible by 20)."""
    root = sysconfig.get_paths()["stdlib"]
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in ("site-packages", "__pycache__"))
        for fn in sorted(filenames):
            rel = os.path.relpath(os.path.join(dirpath, fn), root)
            if fn.endswith(".py") and zlib.crc32(rel.encode()) % 20 == 0:
                with open(os.path.join(dirpath, fn), encoding="utf-8", errors="replace") as f:
                    text = f.read()
                if len(text) > 2000:
                    return text[:max_chars]
    pytest.skip("no held-out standard-library file found")


def test_bundled_names():
    assert gptcpp.bundled_models()[:2] == [MAIN, DRAFT]
    for name in (MAIN, DRAFT):
        info = json.load(open(os.path.join(resolve_model_dir(name), "training_info.json")))
        assert info["heldout_perplexity"] < 100 < 50257  # far below unigram-ish and uniform


def test_bundled_model_scores_like_transformers():
    model = gptcpp.GPT2.from_pretrained(MAIN)
    text = heldout_text(3000)
    ids = model.tokenizer.encode(text)[:256]
    ref = transformers.GPT2LMHeadModel.from_pretrained(resolve_model_dir(MAIN), dtype=torch.float32).eval()
    with torch.no_grad():
        loss = ref(torch.tensor([ids]), labels=torch.tensor([ids])).loss.item()
    s = model.score(ids)
    assert abs(-s.total_logprob / s.n_scored - loss) < 1e-4
    assert math.exp(loss) < 50257 / 10  # one window; the mean over the held-out split is in training_info.json
    with torch.no_grad():
        logits = ref(torch.tensor([ids])).logits[0].numpy()
    assert np.abs(model.logits(ids) - logits).max() < 1e-4


@pytest.mark.parametrize("dtype,bound", [("fp16", 0.005), ("bf16", 0.005), ("int8", 0.015), ("int4", 0.06)])
def test_smaller_formats_on_the_trained_model(dtype, bound):
    text = heldout_text()
    ref = gptcpp.GPT2.from_pretrained(MAIN)
    ids = ref.tokenizer.encode(text)[:256]
    got = gptcpp.GPT2.from_pretrained(MAIN, dtype=dtype)
    a, b = ref.logits(ids), got.logits(ids)
    rel = np.sqrt(((b - a) ** 2).mean()) / np.sqrt((a ** 2).mean())
    p0, p1 = ref.score(ids).perplexity, got.score(ids).perplexity
    print(f"{dtype}: RMS logit error / RMS logit {rel:.4%}; held-out perplexity {p0:.3f} -> {p1:.3f}")
    assert rel <= bound
    assert abs(p1 - p0) / p0 < 0.02


def test_speculation_with_the_trained_draft():
    target = gptcpp.GPT2.from_pretrained(MAIN)
    draft = gptcpp.GPT2.from_pretrained(DRAFT)
    prompt = heldout_text(600)
    plain = target.generate(prompt, max_new_tokens=60, eos_token_id=[])
    spec = target.generate(prompt, max_new_tokens=60, eos_token_id=[], assistant_model=draft)
    look = target.generate(prompt, max_new_tokens=60, eos_token_id=[], prompt_lookup_num_tokens=4)
    assert spec.token_ids == plain.token_ids and look.token_ids == plain.token_ids
    rate = spec.accepted_tokens / max(1, spec.proposed_tokens)
    print(f"trained draft: {spec.accepted_tokens}/{spec.proposed_tokens} proposals accepted ({rate:.0%}); "
          f"prompt lookup {look.accepted_tokens}/{look.proposed_tokens}")
    assert spec.accepted_tokens > 0  # a trained draft agrees with its target, unlike random weights
