"""The whole model against transformers' GPT2LMHeadModel: logits within 1e-4 and greedy decoding
token-identical, for several configs, on every instruction-set level."""
import numpy as np
import pytest
import torch

import gptcpp
from conftest import random_gpt2, rng_ids, save, torch_logits

CONFIGS = {
    "base": {},
    "deep-narrow-heads": dict(n_layer=4, n_head=8, n_embd=48),
    "one-head-odd-width": dict(n_layer=1, n_head=1, n_embd=20),
    "n_inner": dict(n_inner=50),
    "eps": dict(layer_norm_epsilon=1e-3),
    "gelu-exact": dict(activation_function="gelu"),
    "gelu_pytorch_tanh": dict(activation_function="gelu_pytorch_tanh"),
    "relu": dict(activation_function="relu"),
    "quick_gelu": dict(activation_function="quick_gelu"),
    "silu": dict(activation_function="silu"),
    "no-attn-scale": dict(scale_attn_weights=False),
    "inverse-layer-scale": dict(scale_attn_by_inverse_layer_idx=True, n_layer=3),
    "reorder-upcast": dict(reorder_and_upcast_attn=True),
    "untied-head": dict(tie_word_embeddings=False),
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    out = {}
    for name, cfg in CONFIGS.items():
        m = random_gpt2(seed=len(name), **cfg)
        out[name] = (m, save(m, tmp_path_factory.mktemp(name)))
    return out


@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_match_transformers(checkpoints, name, isa):
    ref_model, path = checkpoints[name]
    model = gptcpp.GPT2.from_pretrained(path)
    n_pos = model.config.n_positions
    for length in (1, 2, 7, 33, n_pos):
        ids = rng_ids(length, model.config.vocab_size, seed=length)
        ref = torch_logits(ref_model, ids)
        got = model.logits(ids)
        assert got.dtype == np.float32 and got.shape == ref.shape
        err = np.abs(got - ref).max()
        assert err <= 1e-4, f"{name} len={length}: max |diff| {err}"


def test_incremental_decoding_matches_full_pass(checkpoints, isa):
    ref_model, path = checkpoints["base"]
    model = gptcpp.GPT2.from_pretrained(path)
    ids = rng_ids(40, model.config.vocab_size, seed=3)
    full = model.logits(ids)
    cache = model.new_cache(len(ids))
    rows = [model.forward(cache, ids[:17])]  # a prefill chunk, then single tokens, then a chunk
    for t in ids[17:30]:
        rows.append(model.forward(cache, [t]))
    rows.append(model.forward(cache, ids[30:]))
    inc = np.concatenate(rows)
    assert cache.length == len(ids)
    assert np.abs(inc - full).max() <= 1e-5
    assert np.abs(inc - torch_logits(ref_model, ids)).max() <= 1e-4


@pytest.mark.parametrize("name", ["base", "deep-narrow-heads", "gelu-exact", "inverse-layer-scale"])
def test_greedy_64_tokens_identical(checkpoints, name, isa):
    ref_model, path = checkpoints[name]
    model = gptcpp.GPT2.from_pretrained(path)
    prompt = rng_ids(5, model.config.vocab_size, seed=11)
    with torch.no_grad():
        ref = ref_model.generate(torch.tensor([prompt]), max_new_tokens=64, min_new_tokens=64, do_sample=False,
                                 pad_token_id=1, eos_token_id=1)[0, len(prompt):].tolist()
    got = model.generate(prompt, max_new_tokens=64, min_new_tokens=64)
    assert got.token_ids == ref
    assert got.finish_reason == "length"


def test_gpt2_124m_shape(tmp_path, isa):
    """One run at the real gpt2 shape (random weights): 12 layers, 12 heads, 768 wide, 50257 tokens."""
    if isa == "generic":
        pytest.skip("the portable path is covered on small models; at 124M it only repeats them slowly")
    ref_model = random_gpt2(seed=5, vocab_size=50257, n_positions=1024, n_embd=768, n_layer=12, n_head=12,
                            bos_token_id=50256, eos_token_id=50256)
    path = save(ref_model, tmp_path / "gpt2")
    model = gptcpp.GPT2.from_pretrained(path)
    ids = rng_ids(48, 50257, seed=1)
    err = np.abs(model.logits(ids) - torch_logits(ref_model, ids)).max()
    assert err <= 1e-4, err


def test_logits_bit_identical_for_any_thread_count(checkpoints, isa):
    """No reduction is split across threads, and threads split work in whole tiles or column blocks."""
    _, path = checkpoints["deep-narrow-heads"]
    model = gptcpp.GPT2.from_pretrained(path)
    ids = rng_ids(100, model.config.vocab_size, seed=5)
    results = []
    for threads in (1, 2, 3, 5, 16):
        model.threads = threads
        results.append(model.logits(ids))
    model.threads = None
    assert all(np.array_equal(results[0], r) for r in results[1:])
