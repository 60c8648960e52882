"""Speculative decoding (draft model, prompt lookup) and the prefix cache: exact against plain decoding."""
import numpy as np
import pytest
import torch
from scipy.stats import chi2 as chi2_dist

import gptcpp
from conftest import random_gpt2, rng_ids, save


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A target, a draft that is the target itself (agrees always), and an unrelated draft (rarely agrees)."""
    d = tmp_path_factory.mktemp("spec")
    target = save(random_gpt2(seed=31, vocab_size=97, n_layer=2), d / "target")
    other = save(random_gpt2(seed=32, vocab_size=97, n_layer=1, n_embd=16, n_head=2), d / "other")
    return (gptcpp.GPT2.from_pretrained(target), gptcpp.GPT2.from_pretrained(target),
            gptcpp.GPT2.from_pretrained(other), target)


def signature(r):
    return r.token_ids, [x.logprob for x in r.logprobs], r.finish_reason


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("which", ["self", "other", "lookup"])
def test_greedy_speculation_is_exact(models, which, threads):
    target, same, other, _ = models
    target.threads = threads
    prompts = [rng_ids(n, 97, seed=n) + rng_ids(6, 97, seed=99) * 3 for n in (2, 5, 9)]  # repetitive tails
    kw = dict(max_new_tokens=40, logprobs=2, eos_token_id=[])
    plain = target.generate(prompts, **kw)
    spec = {"self": dict(assistant_model=same, num_assistant_tokens=4),
            "other": dict(assistant_model=other, num_assistant_tokens=3),
            "lookup": dict(prompt_lookup_num_tokens=4)}[which]
    got = target.generate(prompts, **kw, **spec)
    alone = [target.generate(p, **kw, **spec) for p in prompts]
    target.threads = None
    for p, g, a in zip(plain, got, alone):
        assert signature(g) == signature(p)  # token-identical, and logits bit-identical
        assert signature(a) == signature(p)
        assert g.accepted_tokens <= g.proposed_tokens
    if which == "self":
        assert all(g.accepted_tokens == g.proposed_tokens > 0 for g in got)
    if which == "lookup":
        assert sum(g.accepted_tokens for g in got) > 0


@pytest.mark.parametrize("kw", [dict(repetition_penalty=1.4), dict(no_repeat_ngram_size=2), dict(min_new_tokens=20),
                                dict(bad_words_ids=[[3], [5, 6]])])
def test_processors_with_speculation(models, kw):
    target, same, _, _ = models
    prompt = rng_ids(7, 97, seed=3)
    plain = target.generate(prompt, max_new_tokens=25, eos_token_id=1, **kw)
    for spec in (dict(assistant_model=same), dict(prompt_lookup_num_tokens=3)):
        assert target.generate(prompt, max_new_tokens=25, eos_token_id=1, **kw, **spec).token_ids == plain.token_ids


def test_limits_are_exact(models):
    target, same, _, _ = models
    prompt = rng_ids(5, 97, seed=8)
    for n in (1, 2, 3, 7):
        r = target.generate(prompt, max_new_tokens=n, assistant_model=same, num_assistant_tokens=8, eos_token_id=[])
        assert len(r.token_ids) == n and r.finish_reason == "length"
    first = target.generate(prompt, max_new_tokens=12, eos_token_id=[]).token_ids
    eos = first[4]
    r = target.generate(prompt, max_new_tokens=12, assistant_model=same, eos_token_id=eos)
    assert r.token_ids == first[:first.index(eos) + 1] and r.finish_reason == "eos"
    n_pos = target.config.n_positions
    r = target.generate(rng_ids(n_pos - 6, 97), max_new_tokens=50, assistant_model=same, eos_token_id=[])
    assert len(r.token_ids) == 6 and r.finish_reason == "length"


def test_streaming_with_speculation(tmp_path):
    from conftest import copy_gpt2_vocab
    m = random_gpt2(seed=5, vocab_size=50257, n_embd=32, n_layer=1, n_head=2, bos_token_id=50256,
                    eos_token_id=50256)
    save(m, tmp_path)
    copy_gpt2_vocab(tmp_path)
    model = gptcpp.GPT2.from_pretrained(str(tmp_path))
    draft = gptcpp.GPT2.from_pretrained(str(tmp_path))
    text = model.generate("Hello hello hello", max_new_tokens=30).text
    pieces = list(model.stream("Hello hello hello", max_new_tokens=30, assistant_model=draft))
    assert "".join(pieces) == text


def test_sampling_reproducible_and_seeded(models):
    target, _, other, _ = models
    prompt = rng_ids(6, 97, seed=12)
    kw = dict(max_new_tokens=30, do_sample=True, seed=9, assistant_model=other, eos_token_id=[])
    a = target.generate(prompt, **kw)
    target.threads = 1
    b = target.generate([prompt, rng_ids(3, 97)], **kw)[0]
    target.threads = None
    assert a.token_ids == b.token_ids
    assert target.generate(prompt, **{**kw, "seed": 10}).token_ids != a.token_ids


@pytest.mark.parametrize("which", ["other", "lookup"])
def test_speculative_sampling_keeps_the_distribution(models, which):
    """The first generated token's frequencies over many seeds match the target's sampling distribution."""
    target, _, other, path = models
    prompt = [4, 8, 15, 16, 23, 42, 4, 8, 15]  # lookup proposes 16 after "8 15"
    ref_model = random_gpt2(seed=31, vocab_size=97, n_layer=2)
    with torch.no_grad():
        logits = ref_model(torch.tensor([prompt])).logits[0, -1].double().numpy()
    temperature = 2.0  # a flat distribution, so that many tokens get drawn
    p = np.exp(logits / temperature - (logits / temperature).max())
    p /= p.sum()
    spec = dict(assistant_model=other, num_assistant_tokens=2) if which == "other" else dict(prompt_lookup_num_tokens=2)
    n = 1500
    counts = np.zeros(97)
    accepted = 0
    for seed in range(n):
        r = target.generate(prompt, max_new_tokens=2, do_sample=True, temperature=temperature, top_k=0, seed=seed,
                            eos_token_id=[], **spec)
        counts[r.token_ids[0]] += 1
        accepted += r.accepted_tokens
    assert accepted > 0, "no proposal was ever accepted: the test would not exercise the acceptance rule"
    keep = p * n >= 5
    expected = np.append(n * p[keep], n * p[~keep].sum())
    observed = np.append(counts[keep], counts[~keep].sum())
    stat = ((observed - expected) ** 2 / expected).sum()
    assert chi2_dist.sf(stat, len(expected) - 1) > 1e-3, stat


def test_bad_speculation_options(models):
    target, same, _, _ = models
    with pytest.raises(ValueError, match="num_assistant_tokens"):
        target.generate([1, 2], assistant_model=same, num_assistant_tokens=0)
    with pytest.raises(ValueError, match="cannot be combined"):
        target.generate([1, 2], assistant_model=same, prompt_lookup_num_tokens=3)
    with pytest.raises(ValueError, match="num_beams"):
        target.generate([1, 2], assistant_model=same, num_beams=2)


def test_assistant_with_another_vocabulary_is_refused(models, tmp_path):
    target = models[0]
    small = gptcpp.GPT2.from_pretrained(save(random_gpt2(vocab_size=50), tmp_path / "small"))
    with pytest.raises(ValueError, match="vocab"):
        target.generate([1, 2], assistant_model=small)


def test_prefix_cache_bit_identical_bounded_lru(models):
    _, _, _, path = models
    plain = gptcpp.GPT2.from_pretrained(path)
    cached = gptcpp.GPT2.from_pretrained(path, prefix_cache_tokens=100)
    header = rng_ids(40, 97, seed=50)
    prompts = [header + rng_ids(k, 97, seed=k) for k in (1, 5, 17)]
    kw = dict(max_new_tokens=15, logprobs=3, eos_token_id=[])
    for p in prompts:
        assert signature(cached.generate(p, **kw)) == signature(plain.generate(p, **kw))
    assert cached.prefix_cache_tokens <= 100
    # batched prompts sharing the header: still identical
    assert [signature(r) for r in cached.generate(prompts, **kw)] == [signature(r) for r in plain.generate(prompts, **kw)]
    # eviction: two new 60-token prompts push the oldest entries out of the 100-token budget
    for s in (60, 61):
        cached.generate(rng_ids(60, 97, seed=s), max_new_tokens=1)
        assert cached.prefix_cache_tokens <= 100
    assert cached._core.prefix_cache_entries == 1
    with pytest.raises(ValueError, match="prefix_cache_tokens"):
        gptcpp.GPT2.from_pretrained(path, prefix_cache_tokens=-1)


def test_prefix_cache_serves_the_shared_header(models):
    _, _, _, path = models
    model = gptcpp.GPT2.from_pretrained(path, prefix_cache_tokens=1000)
    from gptcpp import _core
    header = rng_ids(80, 97, seed=7)
    model.generate(header + [3], max_new_tokens=1)
    dec = _core.Decoder(model._core)
    dec.add(header + [5, 6], {"eos_token_ids": []}, 2)
    assert dec.prefix_hits == 80


@pytest.mark.parametrize("kv", ["fp32", "fp16"])
def test_kv_blocks_shared_copy_on_write_and_freed_by_reference(models, kv):
    """The KV cache's 64-position blocks are shared, not copied, between sequences (the prefix cache and beams
    use this); a cache writing into a shared block copies it first, so neither sequence sees the other's
    later tokens, and a block lives as long as some cache holds it."""
    _, _, _, path = models
    model = gptcpp.GPT2.from_pretrained(path, dtype="fp32" if kv == "fp32" else "fp16")
    assert model.kv_cache_dtype == kv
    prompt, other = rng_ids(100, 97, seed=60), rng_ids(30, 97, seed=61)

    def fresh_logits(ids):
        cache = model.new_cache(len(ids))
        return model.forward(cache, ids)

    a = model.new_cache(128)
    model.forward(a, prompt)
    assert (a.length, a.blocks_held, a.blocks_shared) == (100, 2, 0)
    b = model.new_cache(128)
    b.share_prefix_from(a, 70)  # positions 0..69: block 0 whole, block 1 in part
    assert (b.length, b.blocks_held, a.blocks_shared, b.blocks_shared) == (70, 2, 2, 2)
    got_b = model.forward(b, other)  # writes positions 70.. into its own copy of block 1
    assert np.array_equal(got_b, fresh_logits(prompt[:70] + other)[70:])
    assert (a.blocks_shared, b.blocks_shared) == (1, 1)  # block 0 still shared, block 1 copied
    got_a = model.forward(a, [5, 6])  # a's block 1 is untouched by b's writes
    assert np.array_equal(got_a, fresh_logits(prompt + [5, 6])[100:])
    del a  # b alone holds block 0 now: freed by reference count, not copied
    assert (b.blocks_held, b.blocks_shared) == (2, 0)
    # a cache truncated back into a shared block, then written past it (speculation's rollback over a shared
    # prefix): both shared blocks are copied, the second one with nothing of it in use
    c = model.new_cache(128)
    c.share_prefix_from(b, 100)
    c.truncate(10)
    assert np.array_equal(model.forward(c, other + other), fresh_logits(prompt[:10] + other + other)[10:])
    assert (c.blocks_shared, b.blocks_shared) == (0, 0)
    assert np.array_equal(model.forward(b, [7]), fresh_logits(prompt[:70] + other + [7])[100:])
    with pytest.raises(ValueError, match="prefix longer than the cache"):
        model.new_cache(128).share_prefix_from(b, b.length + 1)
