"""Generation: beam search and logits processing against transformers, sampling statistics, batching,
streaming, threads, seeds, scoring and option checking."""
import math
import threading

import numpy as np
import pytest
import torch
from scipy.stats import chi2 as chi2_dist
from transformers import generation as hf_gen

import gptcpp
from gptcpp import _core
from conftest import copy_gpt2_vocab, random_gpt2, rng_ids, save, torch_logits


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    m = random_gpt2(seed=21, vocab_size=97, n_embd=32, n_layer=2, n_head=2)
    return m, gptcpp.GPT2.from_pretrained(save(m, tmp_path_factory.mktemp("gen")))


@pytest.fixture(scope="module")
def text_model(tmp_path_factory):
    """A tiny model with GPT-2's real 50,257-token vocabulary, so that text goes through real BPE."""
    m = random_gpt2(seed=4, vocab_size=50257, n_embd=32, n_layer=2, n_head=2, bos_token_id=50256,
                    eos_token_id=50256)
    d = tmp_path_factory.mktemp("text")
    save(m, d)
    copy_gpt2_vocab(d)
    return m, gptcpp.GPT2.from_pretrained(str(d))


def hf_generate(model, prompt, **kw):
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), pad_token_id=1, eos_token_id=1, **kw)
    return [row[len(prompt):].tolist() for row in out]


def strip_pad(hf_row, ours, pad=1):
    """transformers pads shorter beams with pad (== eos here) up to the longest returned one."""
    return hf_row[:len(ours)], hf_row[len(ours):]


BEAM_CASES = [
    dict(num_beams=2),
    dict(num_beams=3, length_penalty=0.5),
    dict(num_beams=4, length_penalty=2.0, early_stopping=True),
    dict(num_beams=5, early_stopping="never", num_return_sequences=3),
    dict(num_beams=3, no_repeat_ngram_size=2),
    dict(num_beams=4, repetition_penalty=1.3, num_return_sequences=2),
    dict(num_beams=2, min_new_tokens=10, length_penalty=-0.5),
]


@pytest.mark.parametrize("case", range(len(BEAM_CASES)))
@pytest.mark.parametrize("prompt_seed", [1, 2, 3])
def test_beam_search_matches_transformers(pair, case, prompt_seed):
    ref, model = pair
    kw = BEAM_CASES[case]
    prompt = rng_ids(4 + prompt_seed, 97, seed=prompt_seed)
    want = hf_generate(ref, prompt, max_new_tokens=24, do_sample=False, **kw)
    got = model.generate(prompt, max_new_tokens=24, eos_token_id=1, **kw)
    got = got if isinstance(got, list) else [got]
    assert len(got) == len(want)
    for g, w in zip(got, want):
        head, tail = strip_pad(w, g.token_ids)
        assert g.token_ids == head, (kw, g.token_ids, w)
        assert all(t == 1 for t in tail)


def test_beam_search_hits_eos(tmp_path):
    """A model biased towards EOS, so that beams finish early and the finished set is exercised."""
    ref = random_gpt2(seed=8, vocab_size=50)
    with torch.no_grad():
        ref.transformer.wte.weight[1] *= 3.0  # tied: the LM head row of EOS grows too
    model = gptcpp.GPT2.from_pretrained(save(ref, tmp_path / "m"))
    ended = 0
    for s in range(6):
        prompt = rng_ids(3, 50, seed=100 + s)
        for kw in (dict(num_beams=3), dict(num_beams=4, early_stopping=True, num_return_sequences=4)):
            want = hf_generate(ref, prompt, max_new_tokens=16, do_sample=False, **kw)
            got = model.generate(prompt, max_new_tokens=16, eos_token_id=1, **kw)
            got = got if isinstance(got, list) else [got]
            for g, w in zip(got, want):
                assert g.token_ids == w[:len(g.token_ids)]
                ended += g.finish_reason == "eos"
    assert ended > 0, "the EOS-biased model never finished a beam with EOS: the test proves nothing"


@pytest.mark.parametrize("kw", [dict(repetition_penalty=1.5), dict(no_repeat_ngram_size=2),
                                dict(no_repeat_ngram_size=3, repetition_penalty=0.8),
                                dict(bad_words_ids=[[5], [7, 8], [30, 31, 32]]), dict(min_new_tokens=30)])
def test_greedy_with_processors_matches_transformers(pair, kw):
    ref, model = pair
    prompt = rng_ids(6, 97, seed=9)
    want = hf_generate(ref, prompt, max_new_tokens=32, do_sample=False, **kw)[0]
    got = model.generate(prompt, max_new_tokens=32, eos_token_id=1, **kw)
    assert got.token_ids == want[:len(got.token_ids)]


def processed(logits, tokens, n_prompt, warp=False, **opts):
    return _core.process_logits(np.asarray(logits, np.float32), tokens, n_prompt, opts, warp)


def hf_process(proc, logits, tokens):
    return proc(torch.tensor([tokens]), torch.tensor(np.asarray(logits, np.float32))[None])[0].numpy()


@pytest.mark.parametrize("seed", range(4))
def test_each_processor_matches_transformers(seed):
    rng = np.random.default_rng(seed)
    V = 300
    logits = (rng.standard_normal(V) * 3).astype(np.float32)
    tokens = rng.integers(0, V, 40).tolist()
    tokens[-2:] = tokens[10:12]  # make n-gram bans fire
    P = 25
    cases = [
        (hf_gen.RepetitionPenaltyLogitsProcessor(1.7), dict(repetition_penalty=1.7), False),
        (hf_gen.NoRepeatNGramLogitsProcessor(3), dict(no_repeat_ngram_size=3), False),
        (hf_gen.NoBadWordsLogitsProcessor([[3], [tokens[-1], 9], [tokens[-2], tokens[-1], 4]], eos_token_id=[2]),
         dict(bad_words_ids=[[3], [tokens[-1], 9], [tokens[-2], tokens[-1], 4]], eos_token_ids=[2]), False),
        (hf_gen.MinNewTokensLengthLogitsProcessor(P, 30, eos_token_id=[2, 5]),
         dict(min_new_tokens=30, eos_token_ids=[2, 5]), False),
        (hf_gen.SequenceBiasLogitsProcessor({(7,): 2.5, (9,): -4.0}), dict(logit_bias=[(7, 2.5), (9, -4.0)]), False),
        (hf_gen.TemperatureLogitsWarper(0.7), dict(temperature=0.7), True),
        (hf_gen.TopKLogitsWarper(13), dict(top_k=13), True),
        (hf_gen.TopPLogitsWarper(0.8), dict(top_p=0.8), True),
        (hf_gen.MinPLogitsWarper(0.1), dict(min_p=0.1), True),
        (hf_gen.TypicalLogitsWarper(0.7), dict(typical_p=0.7), True),
    ]
    for proc, opts, warp in cases:
        want = hf_process(proc, logits, tokens)
        got = processed(logits, tokens, P, warp, **opts)
        assert np.array_equal(np.isinf(want), np.isinf(got)), (proc, opts)
        finite = ~np.isinf(want)
        np.testing.assert_allclose(got[finite], want[finite], rtol=1e-6, atol=1e-6, err_msg=str(opts))


def test_top_k_one_equals_greedy(pair):
    _, model = pair
    prompt = rng_ids(5, 97, seed=2)
    greedy = model.generate(prompt, max_new_tokens=20, eos_token_id=[])
    for seed in range(3):
        s = model.generate(prompt, max_new_tokens=20, do_sample=True, top_k=1, seed=seed, eos_token_id=[])
        assert s.token_ids == greedy.token_ids


def test_sampling_frequencies_chi_square():
    """Draws from fixed processed logits follow softmax(processed) (chi-square, p > 1e-3)."""
    rng = np.random.default_rng(0)
    V, n = 12, 30000
    logits = (rng.standard_normal(V) * 1.5).astype(np.float32)
    proc = processed(logits, [0], 1, True, do_sample=True, temperature=0.8, top_k=8, top_p=0.95)
    p = np.exp(proc - proc.max())
    p /= p.sum()
    counts = np.zeros(V)
    for i in range(n):
        counts[_core.sample_token(proc, _core.uniform(1234, 0, i))] += 1
    assert counts[p == 0].sum() == 0
    keep = p > 0
    expected = n * p[keep]
    chi2 = ((counts[keep] - expected) ** 2 / expected).sum()
    assert chi2_dist.sf(chi2, keep.sum() - 1) > 1e-3, chi2


def test_seed_reproducible_across_threads_and_batches(pair):
    _, model = pair
    prompts = [rng_ids(3 + i, 97, seed=i) for i in range(4)]
    kw = dict(max_new_tokens=25, do_sample=True, temperature=1.3, top_p=0.9, seed=77, logprobs=2, eos_token_id=[])
    model.threads = 1
    alone = [model.generate(p, **kw) for p in prompts]
    model.threads = 2
    batch = model.generate(prompts, **kw)
    model.threads = None
    for a, b in zip(alone, batch):
        assert a.token_ids == b.token_ids
        assert [x.logprob for x in a.logprobs] == [x.logprob for x in b.logprobs]  # bit-identical
    other = model.generate(prompts[0], **{**kw, "seed": 78})
    assert other.token_ids != alone[0].token_ids


def test_batch_equals_one_by_one_greedy_bit_identical(pair):
    _, model = pair
    prompts = [rng_ids(1 + 3 * i, 97, seed=40 + i) for i in range(7)]
    alone = [model.generate(p, max_new_tokens=30, logprobs=3, eos_token_id=[]) for p in prompts]
    batch = model.generate(prompts, max_new_tokens=30, logprobs=3, eos_token_id=[])
    for a, b in zip(alone, batch):
        assert a.token_ids == b.token_ids
        assert [(x.logprob, x.top_logprobs) for x in a.logprobs] == [(x.logprob, x.top_logprobs) for x in b.logprobs]


def test_concurrent_threads_equal_serial(pair):
    _, model = pair
    prompts = [rng_ids(4, 97, seed=60 + i) for i in range(4)]
    serial = [model.generate(p, max_new_tokens=40, eos_token_id=[]).token_ids for p in prompts]
    results = [None] * len(prompts)

    def work(i):
        results[i] = model.generate(prompts[i], max_new_tokens=40, eos_token_id=[]).token_ids

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == serial


def test_num_return_sequences_sampling(pair):
    _, model = pair
    out = model.generate(rng_ids(4, 97), max_new_tokens=10, do_sample=True, num_return_sequences=3, seed=5)
    assert len(out) == 3 and len({tuple(r.token_ids) for r in out}) > 1


def test_logprobs_are_log_softmax_of_model(pair):
    ref, model = pair
    prompt = rng_ids(6, 97, seed=31)
    r = model.generate(prompt, max_new_tokens=5, logprobs=3, eos_token_id=[])
    ids = prompt + r.token_ids
    lg = torch.log_softmax(torch.tensor(torch_logits(ref, ids)), -1).numpy()
    for i, lp in enumerate(r.logprobs):
        row = lg[len(prompt) - 1 + i]
        assert abs(lp.logprob - row[lp.token_id]) < 1e-4
        assert [t for t, _, _ in lp.top_logprobs] == list(np.argsort(-row)[:3])


def test_stream_pieces_join_to_generate_text(text_model):
    _, model = text_model
    for prompt in ["Once upon a time", "日本語のテキスト 🎉", "def f(x):\n    return"]:
        for kw in (dict(), dict(do_sample=True, seed=3, temperature=1.5)):
            full = model.generate(prompt, max_new_tokens=40, **kw).text
            pieces = list(model.stream(prompt, max_new_tokens=40, **kw))
            assert "".join(pieces) == full
            assert all("\ufffd" not in p for p in pieces[:-1])


def test_stream_multibyte_characters_never_split(text_model):
    """Force generation of a character split over byte tokens: bias the two byte tokens of 'é'."""
    _, model = text_model
    tok = model.tokenizer
    ids = tok.encode("é")
    assert len(ids) >= 1
    byte_ids = [tok.backend.token_to_id(c) for c in ("Ã", "©")]  # byte-level symbols of 0xC3 0xA9
    bias = {byte_ids[0]: 60.0}
    out = model.generate("x", max_new_tokens=1, logit_bias=bias)
    assert out.token_ids == [byte_ids[0]]
    # Now alternate: 0xC3 then 0xA9, by running with logit_bias on both but banning repeats.
    pieces = list(model.stream("x", max_new_tokens=6, logit_bias={byte_ids[0]: 60.0, byte_ids[1]: 59.0},
                               no_repeat_ngram_size=1))
    text = model.generate("x", max_new_tokens=6, logit_bias={byte_ids[0]: 60.0, byte_ids[1]: 59.0},
                          no_repeat_ngram_size=1).text
    assert "".join(pieces) == text and "é" in text
    assert all("\ufffd" not in p for p in pieces)


def test_stop_strings(text_model):
    _, model = text_model
    base = model.generate("Hello", max_new_tokens=30)
    assert len(base.text) > 6
    stop = base.text[3:6]
    r = model.generate("Hello", max_new_tokens=30, stop=[stop])
    assert r.finish_reason == "stop" and r.text == base.text[:base.text.find(stop)]
    assert "".join(model.stream("Hello", max_new_tokens=30, stop=stop)) == r.text


def test_score_matches_transformers_loss(text_model):
    ref, model = text_model
    text = "The quick brown fox jumps over the lazy dog. Ünïcödé and emoji 🦊 too."
    s = model.score(text)
    ids = model.tokenizer.encode(text)
    with torch.no_grad():
        loss = ref(torch.tensor([ids]), labels=torch.tensor([ids])).loss.item()
    assert s.n_scored == len(ids) - 1
    assert abs(-s.total_logprob / s.n_scored - loss) < 1e-4
    assert abs(s.perplexity - math.exp(loss)) < 1e-3 * math.exp(loss)


def test_score_sliding_window_over_long_input(pair):
    ref, model = pair
    ids = rng_ids(300, 97, seed=8)  # n_positions is 128
    s = model.score(ids, stride=64)
    assert s.n_scored == 299 and all(v is not None for v in s.token_logprobs[1:])
    # the first window is scored exactly as a plain forward pass
    lg = torch.log_softmax(torch.tensor(torch_logits(ref, ids[:128])), -1).numpy()
    for i in range(1, 128):
        assert abs(s.token_logprobs[i] - lg[i - 1, ids[i]]) < 1e-4


@pytest.mark.parametrize("bad,name", [
    (dict(temperature=-1), "temperature"), (dict(top_p=0), "top_p"), (dict(top_p=1.5), "top_p"),
    (dict(num_beams=0), "num_beams"), (dict(num_return_sequences=2), "num_return_sequences"),
    (dict(max_new_tokens=0), "max_new_tokens"), (dict(top_k=-1), "top_k"), (dict(bogus_option=1), "bogus_option"),
    (dict(eos_token_id=10**6), "eos_token_id"), (dict(logit_bias={10**6: 1.0}), "logit_bias"),
    (dict(typical_p=0), "typical_p"), (dict(repetition_penalty=0), "repetition_penalty"),
    (dict(early_stopping="sometimes"), "early_stopping"), (dict(stop=[""]), "stop"),
])
def test_bad_options_raise_value_error_naming_option(pair, bad, name):
    _, model = pair
    with pytest.raises(ValueError, match=name):
        model.generate([1, 2, 3], **bad)


def test_context_limits(pair):
    _, model = pair
    n = model.config.n_positions
    with pytest.raises(ValueError, match="n_positions"):
        model.generate(rng_ids(n + 1, 97), max_new_tokens=2)
    r = model.generate(rng_ids(n - 5, 97), max_new_tokens=50, eos_token_id=[])
    assert r.finish_reason == "length" and len(r.token_ids) == 5


def test_bad_token_ids(pair):
    _, model = pair
    with pytest.raises(ValueError, match="outside the vocabulary"):
        model.generate([1, 2, 97])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        model.generate([-1])


def test_empty_prompt_starts_from_endoftext(text_model):
    ref, model = text_model
    r = model.generate("", max_new_tokens=8)
    want = hf_generate(ref, [50256], max_new_tokens=8, do_sample=False)[0]
    assert r.token_ids == want[:len(r.token_ids)]


def test_eos_finishes(pair):
    _, model = pair
    prompt = rng_ids(5, 97, seed=2)
    first = model.generate(prompt, max_new_tokens=1).token_ids[0]
    r = model.generate(prompt, max_new_tokens=10, eos_token_id=first)
    assert r.finish_reason == "eos" and r.token_ids == [first]
