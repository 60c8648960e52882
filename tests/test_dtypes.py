"""Smaller weight formats: each kernel against numpy on the same stored values, every ISA level; the model's
logit error against fp32 on weights with outlier channels; fp16/bf16 greedy decoding equal to fp32."""
import numpy as np
import pytest

import gptcpp
from gptcpp import _core
from gptcpp.quantize import bf16_to_f32, from_blocked, quantize_int8, to_bf16, to_blocked
from conftest import random_gpt2, rng_ids, save


def stored(w, dtype):
    """(array the kernel takes, float64 values it represents, scales or None)"""
    if dtype == "fp32":
        return w, w.astype(np.float64), None
    if dtype == "fp16":
        h = w.astype(np.float16)
        return h, h.astype(np.float64), None
    if dtype == "bf16":
        b = to_bf16(w)
        return b, bf16_to_f32(b).astype(np.float64), None
    q, s = quantize_int8(w, 0)
    return q, q.astype(np.float64), s


def test_blocked_layout_roundtrip():
    w = np.arange(7 * 130, dtype=np.float32).reshape(7, 130)
    b = to_blocked(w)
    assert b.shape == (3, 7, 64) and np.array_equal(from_blocked(b, 130), w) and not b[2, :, 2:].any()


@pytest.mark.parametrize("blocked", [False, True])
@pytest.mark.parametrize("dtype", ["fp32", "fp16", "bf16", "int8"])
@pytest.mark.parametrize("M,K,N", [(1, 37, 53), (3, 64, 100), (8, 100, 77), (70, 33, 130), (1, 768, 96), (5, 20, 200)])
def test_matmul_formats_against_numpy(isa, dtype, blocked, M, K, N):
    rng = np.random.default_rng(M * K + N)
    a = rng.standard_normal((M, K), dtype=np.float32)
    w = rng.standard_normal((K, N), dtype=np.float32)
    b = rng.standard_normal(N).astype(np.float32)
    arr, vals, scales = stored(w, dtype)
    if blocked:
        arr = to_blocked(arr)
    ref = a.astype(np.float64) @ vals
    if scales is not None:
        ref = ref * scales
    ref += b
    out = _core.kernels.matmul(isa, a, arr, b, np.zeros((M, N), np.float32), False, scales)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5 * np.sqrt(K))


@pytest.mark.parametrize("dtype", ["fp16", "bf16", "int8"])
def test_lm_head_formats_against_numpy(isa, dtype):
    rng = np.random.default_rng(1)
    a = rng.standard_normal((5, 70), dtype=np.float32)
    w = rng.standard_normal((301, 70), dtype=np.float32)
    if dtype == "int8":
        q, s = quantize_int8(w, 1)
        ref = (a.astype(np.float64) @ q.T.astype(np.float64)) * s
        out = _core.kernels.matmul_nt(isa, a, q, s)
    else:
        arr, vals, _ = stored(w, dtype)
        ref = a.astype(np.float64) @ vals.T
        out = _core.kernels.matmul_nt(isa, a, arr)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-4)


def test_f16_conversion_exhaustive(isa):
    """Every finite half value widens exactly (the portable path converts in software)."""
    h = np.arange(65536, dtype=np.uint16).view(np.float16)
    h = np.ascontiguousarray(h[np.isfinite(h)].reshape(1, -1))
    out = _core.kernels.matmul(isa, np.ones((1, 1), np.float32), h, None, np.zeros(h.shape, np.float32), False)
    assert np.array_equal(out[0], h[0].astype(np.float32))


@pytest.fixture(scope="module")
def outlier_model(tmp_path_factory):
    """Moderate random weights plus a few large-magnitude input channels, as trained GPT-2 has."""
    m = random_gpt2(seed=13, scale=0.5, vocab_size=400, n_embd=64, n_head=4, n_layer=3)
    return save(m, tmp_path_factory.mktemp("outliers"))


BOUNDS = {"fp16": 0.005, "bf16": 0.005, "int8": 0.015}


@pytest.mark.parametrize("dtype", ["fp16", "bf16", "int8"])
def test_logit_error_relative_to_fp32(outlier_model, isa, dtype):
    ids = rng_ids(100, 400, seed=4)
    ref = gptcpp.GPT2.from_pretrained(outlier_model).logits(ids)
    got = gptcpp.GPT2.from_pretrained(outlier_model, dtype=dtype).logits(ids)
    rel = np.sqrt(((got - ref) ** 2).mean()) / np.sqrt((ref ** 2).mean())
    print(f"{dtype} on {isa}: RMS logit error / RMS logit = {rel:.4%}")
    assert rel <= BOUNDS[dtype]


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_half_formats_greedy_equal_fp32(outlier_model, dtype):
    prompt = rng_ids(6, 400, seed=9)
    ref = gptcpp.GPT2.from_pretrained(outlier_model).generate(prompt, max_new_tokens=32, eos_token_id=[])
    got = gptcpp.GPT2.from_pretrained(outlier_model, dtype=dtype).generate(prompt, max_new_tokens=32, eos_token_id=[])
    assert got.token_ids == ref.token_ids


@pytest.mark.parametrize("dtype", ["fp16", "bf16", "int8"])
def test_generation_features_work_at_every_dtype(outlier_model, dtype):
    model = gptcpp.GPT2.from_pretrained(outlier_model, dtype=dtype)
    prompts = [rng_ids(3 + i, 400, seed=i) for i in range(3)]
    alone = [model.generate(p, max_new_tokens=12, do_sample=True, seed=3, eos_token_id=[]) for p in prompts]
    batch = model.generate(prompts, max_new_tokens=12, do_sample=True, seed=3, eos_token_id=[])
    assert [a.token_ids for a in alone] == [b.token_ids for b in batch]
    beams = model.generate(prompts[0], max_new_tokens=8, num_beams=3, num_return_sequences=2, eos_token_id=[])
    assert len(beams) == 2
    assert model.score(rng_ids(50, 400)).n_scored == 49


def test_unknown_dtype_is_refused(outlier_model):
    with pytest.raises(ValueError, match="dtype"):
        gptcpp.GPT2.from_pretrained(outlier_model, dtype="int3")


@pytest.mark.parametrize("dtype", ["fp16", "bf16", "int8"])
def test_quantized_checkpoint_loads_without_conversion(outlier_model, tmp_path, dtype):
    from gptcpp.quantize import save_quantized
    dst = save_quantized(outlier_model, str(tmp_path / dtype), dtype)
    converted = gptcpp.GPT2.from_pretrained(outlier_model, dtype=dtype)
    stored = gptcpp.GPT2.from_pretrained(dst)
    assert stored.dtype == dtype
    ids = rng_ids(40, 400, seed=2)
    assert np.array_equal(stored.logits(ids), converted.logits(ids))  # same numbers, bit for bit
    # weights are views of the mapped file, not copies
    big = stored._tensors["h.0.mlp.c_fc.weight"]
    assert not big.flags.owndata
    assert gptcpp.GPT2.from_pretrained(dst, dtype=dtype).dtype == dtype
    other = "fp16" if dtype != "fp16" else "bf16"
    with pytest.raises(ValueError, match=f"holds {dtype} weights"):
        gptcpp.GPT2.from_pretrained(dst, dtype=other)
    with pytest.raises(ValueError, match="already a gptcpp"):
        save_quantized(dst, str(tmp_path / "again"), "int8")
