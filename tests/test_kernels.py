"""Each C++ kernel alone (gptcpp._core.kernels) against a numpy / torch reference, on every instruction-set
level the CPU has: matmul, matmul_nt, layernorm, every activation, attention, logsumexp. Plus the batching
contract of kernels.h: a row's result never depends on how many rows it is computed with."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from gptcpp import _core
from gptcpp.config import SUPPORTED_ACTIVATIONS

K_ = _core.kernels
RTOL = 1e-5


def rand(rng, *shape, scale=1.0):
    return (scale * rng.standard_normal(shape)).astype(np.float32)


def assert_close_dot(got, ref, a, w, rtol=RTOL):
    """got ~ ref (float64) where each element is a float32 dot product: the error bound of a float32
    sum of products is relative to sum |a_k w_k|, not to the (possibly cancelling) result itself."""
    mag = np.abs(a.astype(np.float64)) @ np.abs(w.astype(np.float64))
    err = np.abs(got.astype(np.float64) - ref)
    bound = rtol * (np.abs(ref) + mag) + 1e-30
    worst = np.unravel_index(np.argmax(err / bound), err.shape)
    assert np.all(err <= bound), f"max err {err[worst]} at {worst}, ref {ref[worst]}, bound {bound[worst]}"


# ---- matmul: out[M,N] (+)= inp[M,K] @ w[K,N] + bias -------------------------------------------------------
MS = (1, 2, 5, 6, 7, 8, 13, 64, 65, 100)
KN = [(1, 1), (3, 17), (17, 3), (33, 100), (100, 33), (64, 64), (129, 47), (200, 130), (16, 257)]


@pytest.mark.parametrize("M", MS)
@pytest.mark.parametrize("K,N", KN)
@pytest.mark.parametrize("with_bias", [True, False])
def test_matmul_against_numpy(isa, M, K, N, with_bias):
    rng = np.random.default_rng(1000 * M + 10 * K + N)
    a, w = rand(rng, M, K), rand(rng, K, N)
    b = rand(rng, N) if with_bias else None
    ref = a.astype(np.float64) @ w.astype(np.float64)
    if with_bias:
        ref += b
    out = np.full((M, N), np.nan, np.float32)  # accumulate=False must overwrite, not read, out
    got = K_.matmul(isa, a, w, b, out, False)
    assert got.shape == (M, N) and got.dtype == np.float32
    assert_close_dot(got, ref, a, w)


@pytest.mark.parametrize("M", (1, 6, 7, 13, 64, 70))
@pytest.mark.parametrize("K,N", [(3, 17), (33, 100), (200, 130)])
@pytest.mark.parametrize("with_bias", [True, False])
def test_matmul_accumulate_adds_into_out(isa, M, K, N, with_bias):
    rng = np.random.default_rng(M + K + N)
    a, w, prev = rand(rng, M, K), rand(rng, K, N), rand(rng, M, N, scale=3.0)
    b = rand(rng, N) if with_bias else None
    ref = a.astype(np.float64) @ w.astype(np.float64) + prev
    if with_bias:
        ref += b
    out = prev.copy()
    got = K_.matmul(isa, a, w, b, out, True)
    assert_close_dot(got, ref, np.hstack([a, np.ones((M, 1), np.float32)]),
                     np.vstack([w, np.abs(prev).max(0, keepdims=True)]))
    # The kernel writes into the float32 C-contiguous array it is given.
    assert np.array_equal(got, out)
    # Exactly the contract's order: (sum + bias) then + out, in float32.
    fresh = K_.matmul(isa, a, w, b, np.zeros((M, N), np.float32), False)
    assert np.array_equal(got, (prev + fresh).astype(np.float32))


def test_matmul_zero_and_special_values(isa):
    a = np.zeros((9, 5), np.float32)
    w = np.ones((5, 11), np.float32)
    assert not K_.matmul(isa, a, w, None, np.ones((9, 11), np.float32), False).any()
    a[3, 2] = np.inf
    got = K_.matmul(isa, a, w, None, np.zeros((9, 11), np.float32), False)
    assert np.isposinf(got[3]).all() and np.isfinite(np.delete(got, 3, axis=0)).all()


def test_matmul_rejects_mismatched_shapes(isa):
    with pytest.raises(ValueError, match="shape mismatch"):
        K_.matmul(isa, np.zeros((2, 3), np.float32), np.zeros((4, 5), np.float32), None,
                  np.zeros((2, 5), np.float32), False)
    with pytest.raises(ValueError, match="shape mismatch"):
        K_.matmul(isa, np.zeros((2, 3), np.float32), np.zeros((3, 5), np.float32), None,
                  np.zeros((3, 5), np.float32), False)


# ---- matmul_nt: out[M,N] = inp[M,K] @ w[N,K]^T -----------------------------------------------------------
@pytest.mark.parametrize("M", (1, 2, 3, 4, 5, 7, 13, 64))
@pytest.mark.parametrize("K,N", [(1, 1), (3, 5), (17, 33), (33, 211), (100, 7), (64, 64), (257, 19)])
def test_matmul_nt_against_numpy(isa, M, K, N):
    rng = np.random.default_rng(7 * M + K * N)
    a, w = rand(rng, M, K), rand(rng, N, K)
    ref = a.astype(np.float64) @ w.astype(np.float64).T
    got = K_.matmul_nt(isa, a, w)
    assert got.shape == (M, N) and got.dtype == np.float32
    assert_close_dot(got, ref, a, w.T)


# ---- determinism: a row is bit-identical whatever it is batched with ---------------------------------------
@pytest.mark.parametrize("M", (7, 8, 16, 37, 64, 65, 100))
@pytest.mark.parametrize("K,N", [(33, 100), (300, 47), (64, 257), (5, 3)])
@pytest.mark.parametrize("accumulate", [False, True])
def test_matmul_row_independent_of_batch(isa, M, K, N, accumulate):
    rng = np.random.default_rng(M * 31 + K + N)
    a, w, b, prev = rand(rng, M, K), rand(rng, K, N), rand(rng, N), rand(rng, M, N)
    batch = K_.matmul(isa, a, w, b, prev.copy(), accumulate)
    for r in range(M):
        single = K_.matmul(isa, np.ascontiguousarray(a[r:r + 1]), w, b, prev[r:r + 1].copy(), accumulate)
        assert np.array_equal(single[0], batch[r]), f"row {r} of M={M} differs from the same row alone"
    # and in sub-batches of other sizes (every path: streaming, wide packing, block packing)
    for lo, hi in [(0, 3), (1, min(M, 9)), (M // 2, M)]:
        part = K_.matmul(isa, np.ascontiguousarray(a[lo:hi]), w, b, prev[lo:hi].copy(), accumulate)
        assert np.array_equal(part, batch[lo:hi])


@pytest.mark.parametrize("M", (5, 16, 37))
def test_matmul_nt_row_independent_of_batch(isa, M):
    rng = np.random.default_rng(M)
    a, w = rand(rng, M, 70), rand(rng, 211, 70)
    batch = K_.matmul_nt(isa, a, w)
    for r in range(M):
        assert np.array_equal(K_.matmul_nt(isa, np.ascontiguousarray(a[r:r + 1]), w)[0], batch[r])


def test_matmul_same_result_every_call(isa):
    rng = np.random.default_rng(5)
    a, w, b = rand(rng, 37, 300), rand(rng, 300, 130), rand(rng, 130)
    first = K_.matmul(isa, a, w, b, np.zeros((37, 130), np.float32), False)
    for _ in range(3):
        assert np.array_equal(K_.matmul(isa, a, w, b, np.zeros((37, 130), np.float32), False), first)


# ---- layernorm ---------------------------------------------------------------------------------------------
def layernorm_ref(x, w, b, eps):
    x = x.astype(np.float64)
    mean = x.mean(axis=1, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * w + b


@pytest.mark.parametrize("M", (1, 3, 8))
@pytest.mark.parametrize("C", (1, 2, 7, 8, 16, 17, 32, 33, 100, 768))
@pytest.mark.parametrize("eps", (1e-5, 1e-3))
def test_layernorm_against_numpy(isa, M, C, eps):
    rng = np.random.default_rng(M * C)
    x, w, b = rand(rng, M, C, scale=2.0), 1 + rand(rng, C, scale=0.3), rand(rng, C, scale=0.1)
    got = K_.layernorm(isa, x, w, b, eps)
    assert got.shape == (M, C) and got.dtype == np.float32
    np.testing.assert_allclose(got, layernorm_ref(x, w, b, eps), rtol=RTOL, atol=RTOL)


@pytest.mark.parametrize("C", (17, 64, 768))
def test_layernorm_outliers_and_large_mean(isa, C):
    """GPT-2's residual stream has a few channels in the hundreds; a one-pass E[x^2] - E[x]^2 would lose the
    small channels' variance. Rows: big outlier channels; a mean of 1e4 with unit spread; both."""
    rng = np.random.default_rng(C)
    x = rand(rng, 4, C)
    x[0, [1, C // 2]] = [600.0, -450.0]
    x[1] += 1e4
    x[2] = x[2] * 1e-3 + 300.0  # tiny spread on a large offset
    x[3, 0] = 3000.0
    x[3] += 50.0
    w, b = 1 + rand(rng, C, scale=0.3), rand(rng, C, scale=0.1)
    eps = 1e-5
    got = K_.layernorm(isa, x, w, b, eps).astype(np.float64)
    ref = layernorm_ref(x, w, b, eps)
    # float32 cannot resolve the input better than ulp(|x|): each row's error is bounded by the relative
    # rounding of the row's magnitude against its spread, as for torch's own float32 layer_norm.
    xd = x.astype(np.float64)
    spread = np.sqrt(((xd - xd.mean(1, keepdims=True)) ** 2).mean(1, keepdims=True) + eps)
    cond = np.maximum(1.0, np.abs(xd).max(1, keepdims=True) / spread)
    tol = 4 * RTOL * cond * (np.abs(ref) + np.abs(b) + 1)
    assert np.all(np.abs(got - ref) <= tol), np.abs(got - ref).max()
    # and no worse than torch in float32 (what transformers computes)
    tref = F.layer_norm(torch.from_numpy(x), (C,), torch.from_numpy(w), torch.from_numpy(b), eps).numpy()
    ours, theirs = np.abs(got - ref).max(1), np.abs(tref - ref).max(1)
    assert np.all(ours <= 4 * theirs + 1e-5), (ours, theirs)
    # the outlier row itself (well conditioned once centred) is accurate to float32
    np.testing.assert_allclose(got[0], ref[0], rtol=RTOL, atol=RTOL)


def test_layernorm_constant_row_is_bias(isa):
    x = np.full((2, 40), 7.25, np.float32)
    w, b = np.full(40, 3.0, np.float32), np.linspace(-1, 1, 40).astype(np.float32)
    np.testing.assert_array_equal(K_.layernorm(isa, x, w, b, 1e-5), np.tile(b, (2, 1)))


def test_layernorm_row_independent_of_batch(isa):
    rng = np.random.default_rng(9)
    x, w, b = rand(rng, 13, 100), rand(rng, 100), rand(rng, 100)
    batch = K_.layernorm(isa, x, w, b, 1e-5)
    for r in range(13):
        assert np.array_equal(K_.layernorm(isa, np.ascontiguousarray(x[r:r + 1]), w, b, 1e-5)[0], batch[r])


# ---- activations -------------------------------------------------------------------------------------------
def _gelu_tanh(x):
    return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def _sigmoid(x):
    e = np.exp(-np.abs(x))  # overflow- and cancellation-free in both tails
    return np.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


ERF = np.vectorize(math.erf)
EXACT = {  # float64 formulas, as transformers.activations defines them
    "gelu_new": _gelu_tanh,
    "gelu_pytorch_tanh": _gelu_tanh,
    "gelu_fast": lambda x: 0.5 * x * (1.0 + np.tanh(x * 0.7978845608 * (1.0 + 0.044715 * x * x))),
    "gelu_accurate": lambda x: 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3))),
    "gelu": lambda x: 0.5 * x * (1.0 + ERF(x / math.sqrt(2.0))),
    "quick_gelu": lambda x: x * _sigmoid(1.702 * x),
    "relu": lambda x: np.maximum(x, 0.0),
    "silu": lambda x: x * _sigmoid(x),
    "swish": lambda x: x * _sigmoid(x),
    "tanh": np.tanh,
    "sigmoid": _sigmoid,
    "linear": lambda x: x,
}
TORCH = {  # torch's own functional versions (float64), a second reference
    "gelu_new": lambda t: F.gelu(t, approximate="tanh"),
    "gelu_pytorch_tanh": lambda t: F.gelu(t, approximate="tanh"),
    "gelu": F.gelu,
    "quick_gelu": lambda t: t * torch.sigmoid(1.702 * t),
    "relu": F.relu,
    "silu": F.silu,
    "swish": F.silu,
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
    "linear": lambda t: t,
}


def activation_inputs():
    rng = np.random.default_rng(0)
    x = np.concatenate([
        np.linspace(-12, 12, 2401),
        rng.standard_normal(1000) * 3,
        [0.0, -0.0, 1e-30, -1e-30, 1e-6, -1e-6, 30, -30, 60, -60, 88, -88, 100, -100, 1e3, -1e3, 5e4, -5e4],
    ]).astype(np.float32)
    assert len(x) % 16  # not a multiple of the vector width: the tail is exercised too
    return x


def test_every_supported_activation_has_a_reference():
    assert set(SUPPORTED_ACTIVATIONS) == set(EXACT)


def activation_tolerance(name, x):
    """1e-5 relative. The GELUs are 0.5 x (1 + f(x)) with f -> -1 for x << 0: float32 can hold 1 + f only to
    an absolute ulp(1), so their left tail carries an error of a few eps * |x| (torch's float32 GELU has the
    same, larger: it returns 0 there). The rest (x / (1 + e^-x), tanh, ...) stay relatively accurate; a
    floor of 1e-30 covers results in float32's subnormal range."""
    x = np.abs(x.astype(np.float64))
    eps = np.finfo(np.float32).eps
    cancel = 4 * eps * x if name.startswith("gelu") else 0.0
    if name == "tanh":  # see test_tanh_relative_accuracy_near_zero: an absolute error of ~eps near 0
        cancel = 2 * eps
    return lambda ref: RTOL * np.abs(ref) + cancel + 1e-30


def check_activation(got, ref, tol, what):
    err = np.abs(got.astype(np.float64) - ref)
    bad = err > tol(ref)
    assert not bad.any(), f"{what}: {bad.sum()} values off, worst at x index {np.argmax(err - tol(ref))}: " \
                          f"got {got[bad][:3]}, want {ref[bad][:3]}"


@pytest.mark.parametrize("name", SUPPORTED_ACTIVATIONS)
def test_activation_against_exact_formula(isa, name):
    x = activation_inputs()
    got = K_.activation(isa, x, name)
    assert got.shape == x.shape and got.dtype == np.float32
    assert np.all(np.isfinite(got)), x[~np.isfinite(got)]
    tol = activation_tolerance(name, x)
    check_activation(got, EXACT[name](x.astype(np.float64)), tol, f"{name} vs formula")
    if name in TORCH:
        check_activation(got, TORCH[name](torch.from_numpy(x.astype(np.float64))).numpy(), tol, f"{name} vs torch")


@pytest.mark.parametrize("n", (1, 3, 7, 8, 15, 16, 17, 31, 33))
def test_activation_every_length(isa, n):
    x = np.linspace(-4, 4, n).astype(np.float32)
    for name in ("gelu_new", "gelu", "silu", "relu", "linear"):
        check_activation(K_.activation(isa, x, name), EXACT[name](x.astype(np.float64)),
                         activation_tolerance(name, x), f"{name} n={n}")


def test_tanh_relative_accuracy_near_zero(isa):
    """1 - 2/(e^2|x| + 1) cancels for small |x| (tanh(1e-6) came out 4.6% off): a polynomial is used there."""
    x = np.array([1e-6, -1e-6, 1e-4, 2.6658e-3, 1e-2, 0.05], np.float32)
    check_activation(K_.activation(isa, x, "tanh"), np.tanh(x.astype(np.float64)),
                     lambda ref: RTOL * np.abs(ref), "tanh near 0")


def test_activation_linear_and_relu_are_exact(isa):
    x = activation_inputs()
    assert np.array_equal(K_.activation(isa, x, "linear"), x)
    assert np.array_equal(K_.activation(isa, x, "relu"), np.maximum(x, np.float32(0)))


def test_activation_matches_transformers_act2fn(isa):
    from transformers.activations import ACT2FN
    x = activation_inputs()
    for name in SUPPORTED_ACTIVATIONS:
        ref = ACT2FN[name](torch.from_numpy(x.astype(np.float64))).numpy()
        check_activation(K_.activation(isa, x, name), ref, activation_tolerance(name, x), f"{name} vs ACT2FN")


def test_unknown_activation_is_refused(isa):
    with pytest.raises(ValueError, match="unsupported activation_function 'gelu_10'"):
        K_.activation(isa, np.zeros(4, np.float32), "gelu_10")


# ---- attention ---------------------------------------------------------------------------------------------
def attention_ref(q, k, v, pos0, scale):
    q, k, v = (t.astype(np.float64) for t in (q, k, v))
    T = q.shape[0]
    s = scale * (q @ k.T)
    mask = np.arange(k.shape[0])[None, :] > (pos0 + np.arange(T))[:, None]
    s[mask] = -np.inf
    p = np.exp(s - s.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    return p @ v


@pytest.mark.parametrize("kv", ("fp32", "fp16"))
@pytest.mark.parametrize("hd", (8, 24, 64, 100))
@pytest.mark.parametrize("T,pos0", [(1, 0), (1, 9), (5, 0), (7, 3), (13, 50), (64, 0), (70, 0), (66, 130)])
def test_attention_against_numpy(isa, hd, T, pos0, kv):
    """fp16: the cache rounds keys and values to half, and the kernel computes in float32 from them exactly."""
    rng = np.random.default_rng(hd * 1000 + T * 10 + pos0)
    q, k, v = rand(rng, T, hd, scale=2.0), rand(rng, pos0 + T, hd, scale=2.0), rand(rng, pos0 + T, hd)
    kr, vr = (k.astype(np.float16), v.astype(np.float16)) if kv == "fp16" else (k, v)
    for scale in (1 / math.sqrt(hd), 1.0, 0.37):
        got = K_.attention(isa, q, k, v, pos0, scale, kv)
        assert got.shape == (T, hd) and got.dtype == np.float32
        ref = attention_ref(q, kr, vr, pos0, scale)
        np.testing.assert_allclose(got, ref, rtol=RTOL, atol=RTOL * np.abs(v).max(), err_msg=f"scale={scale}")
    if kv == "fp16":  # and not the float32 keys: the rounding is real
        exact = attention_ref(q, k, v, pos0, 1.0)
        assert np.abs(K_.attention(isa, q, k, v, pos0, 1.0, kv) - exact).max() > 1e-6


def test_to_f16_rounds_as_numpy(isa):
    """Every level's float32 -> half conversion (F16C's vcvtps2ph, or the portable one) rounds to nearest even
    like numpy: ties, subnormals, the overflow edge, infinities and NaN; and reports max |x|."""
    rng = np.random.default_rng(0)
    special = np.array([0.0, -0.0, 1.0, 65504.0, 65519.99, 65520.0, -65520.0, 1e6, np.inf, -np.inf, 2.0 ** -24,
                        2.0 ** -25, 3 * 2.0 ** -26, 2.0 ** -14, 2.0 ** -14 - 2.0 ** -25, 1e-30, -1e-9, 0.1, 1 / 3],
                       dtype=np.float32)
    # ties: float32 values exactly halfway between two halves, around 1 and among the subnormals
    ties = np.concatenate([(1 + (np.arange(40) + 0.5) * 2.0 ** -10), (np.arange(40) + 0.5) * 2.0 ** -24]).astype(np.float32)
    x = np.concatenate([special, ties, rng.standard_normal(3001).astype(np.float32) * 10.0 ** rng.integers(-9, 5, 3001)])
    x = x.astype(np.float32)
    bits, mx = K_.to_f16(isa, x)
    with np.errstate(over="ignore"):  # the values beyond half's range become infinity, as they must
        want = x.astype(np.float16).view(np.uint16)
    assert np.array_equal(bits, want), np.flatnonzero(bits != want)[:5]
    nan_bits, _ = K_.to_f16(isa, np.array([np.nan] * 9, np.float32))
    assert np.isnan(nan_bits.view(np.float16)).all()
    assert mx == np.abs(x).max()


def test_attention_is_causal(isa):
    """Changing a future key or value leaves every earlier row bit-identical."""
    rng = np.random.default_rng(3)
    T, pos0, hd = 12, 4, 24
    q, k, v = rand(rng, T, hd), rand(rng, pos0 + T, hd), rand(rng, pos0 + T, hd)
    base = K_.attention(isa, q, k, v, pos0, 0.2)
    k2, v2 = k.copy(), v.copy()
    k2[pos0 + 8:] = 1e3
    v2[pos0 + 8:] = -1e3
    got = K_.attention(isa, q, k2, v2, pos0, 0.2)
    assert np.array_equal(got[:8], base[:8]) and not np.array_equal(got[8:], base[8:])


def test_attention_first_row_returns_first_value(isa):
    rng = np.random.default_rng(4)
    q, k, v = rand(rng, 3, 8), rand(rng, 3, 8), rand(rng, 3, 8)
    assert np.array_equal(K_.attention(isa, q, k, v, 0, 0.125)[0], v[0])


def test_attention_large_scores_do_not_overflow(isa):
    rng = np.random.default_rng(5)
    q, k, v = rand(rng, 9, 64, scale=30.0), rand(rng, 9, 64, scale=30.0), rand(rng, 9, 64)
    got = K_.attention(isa, q, k, v, 0, 1.0)
    assert np.all(np.isfinite(got))
    np.testing.assert_allclose(got, attention_ref(q, k, v, 0, 1.0), rtol=RTOL, atol=1e-5)


@pytest.mark.parametrize("hd", (8, 64, 100))
def test_attention_rows_incremental_equal_full(isa, hd):
    """A query row gives the same bits whether computed in a prompt of T rows (pos0=0) or alone with the
    earlier keys as cache (pos0=t): what makes incremental decoding exact."""
    rng = np.random.default_rng(hd)
    T = 70
    q, k, v = rand(rng, T, hd), rand(rng, T, hd), rand(rng, T, hd)
    full = K_.attention(isa, q, k, v, 0, 1 / math.sqrt(hd))
    for t in (0, 1, 7, 8, 30, 63, 64, 69):
        one = K_.attention(isa, np.ascontiguousarray(q[t:t + 1]), np.ascontiguousarray(k[:t + 1]),
                           np.ascontiguousarray(v[:t + 1]), t, 1 / math.sqrt(hd))
        assert np.array_equal(one[0], full[t]), f"row {t}"
    part = K_.attention(isa, np.ascontiguousarray(q[20:]), k, v, 20, 1 / math.sqrt(hd))
    assert np.array_equal(part, full[20:])
    # a few rows at once (speculative verification: the decoding step's own loops, not the packed GEMM)
    few = K_.attention(isa, np.ascontiguousarray(q[30:35]), np.ascontiguousarray(k[:35]), np.ascontiguousarray(v[:35]),
                       30, 1 / math.sqrt(hd))
    assert np.array_equal(few, full[30:35])


def test_attention_rejects_wrong_key_count(isa):
    z = np.zeros((3, 8), np.float32)
    with pytest.raises(ValueError, match="pos0 \\+ T"):
        K_.attention(isa, z, np.zeros((4, 8), np.float32), np.zeros((4, 8), np.float32), 0, 1.0)


# ---- logsumexp ---------------------------------------------------------------------------------------------
def lse_ref(x):
    x = x.astype(np.float64)
    mx = x.max()
    if mx == -np.inf:
        return mx, -np.inf
    return mx, math.log(np.exp(x - mx).sum())


@pytest.mark.parametrize("n", (1, 2, 7, 8, 15, 16, 17, 33, 100, 1000, 50257))
def test_logsumexp_against_numpy(isa, n):
    rng = np.random.default_rng(n)
    for x in (rand(rng, n, scale=5.0), rand(rng, n, scale=5.0) + 500.0, rand(rng, n, scale=5.0) - 500.0):
        mx, lse = K_.logsumexp(isa, x)
        rmx, rlse = lse_ref(x)
        assert mx == np.float32(rmx)
        assert abs(lse - rlse) <= RTOL * max(1.0, abs(rlse)), (lse, rlse)
        # the log-softmax it normalises matches torch
        lsm = x.astype(np.float64) - mx - lse
        np.testing.assert_allclose(lsm, torch.log_softmax(torch.from_numpy(x), 0).double().numpy(),
                                   rtol=RTOL, atol=1e-4)


@pytest.mark.parametrize("n", (1, 5, 16, 17, 40, 211))
def test_logsumexp_with_minus_inf(isa, n):
    rng = np.random.default_rng(n)
    x = rand(rng, n, scale=3.0)
    if n > 1:
        masked = x.copy()
        masked[::2] = -np.inf  # masked logits (top-k, bad words) are -inf
        mx, lse = K_.logsumexp(isa, masked)
        rmx, rlse = lse_ref(masked)
        assert mx == np.float32(rmx) and np.isfinite(lse)
        assert abs(lse - rlse) <= RTOL * max(1.0, abs(rlse))
    # the max entry alone (all others -inf): exactly log(1) = 0
    one = np.full(n, -np.inf, np.float32)
    one[n // 2] = 2.5
    assert K_.logsumexp(isa, one) == (2.5, 0.0)
    # every entry -inf
    mx, lse = K_.logsumexp(isa, np.full(n, -np.inf, np.float32))
    assert mx == -np.inf and lse == -np.inf


def test_logsumexp_equal_values(isa):
    for n in (1, 16, 17, 1000):
        mx, lse = K_.logsumexp(isa, np.full(n, 3.0, np.float32))
        assert mx == 3.0 and abs(lse - math.log(n)) <= RTOL * max(1.0, math.log(n))


# ---- levels agree with each other ----------------------------------------------------------------------------
def test_levels_agree_within_tolerance():
    """Every level the CPU runs gives the same results to float32 tolerance (not bit-identity: their vector
    widths differ)."""
    levels = _core.cpu_info()["supported_isas"]
    rng = np.random.default_rng(11)
    a, w, b = rand(rng, 13, 100), rand(rng, 100, 33), rand(rng, 33)
    outs = [K_.matmul(l, a, w, b, np.zeros((13, 33), np.float32), False) for l in levels]
    for o in outs[1:]:
        assert_close_dot(o, outs[0].astype(np.float64), a, w, rtol=2 * RTOL)


def test_unknown_isa_is_refused():
    with pytest.raises(ValueError, match=r"unknown instruction set level 'avx9000' \(known: generic, avx2, avx2-vnni, avx512, avx512-vnni, avx512-bf16, avx512-amx\)"):
        K_.logsumexp("avx9000", np.zeros(3, np.float32))


@pytest.mark.parametrize("n, chunk, threads", [(0, 2, 2), (1, 2, 2), (37, 2, 2), (786, 2, 2), (100, 3, 5), (50, 1, 1)])
def test_stealing_ranges_run_every_unit_once(n, chunk, threads):
    runs, per_thread = _core.kernels.stealing_ranges(n, chunk, threads)
    assert runs.shape == (n,) and (runs == 1).all()
    assert per_thread.sum() == n


def test_stealing_ranges_move_a_slow_threads_units_to_the_others():
    # Thread 0 spins 500 us before each of its ranges: the other takes most of its half.
    runs, per_thread = _core.kernels.stealing_ranges(32, 2, 2, slow_us=500.0)
    assert (runs == 1).all()
    assert per_thread[1] > 16
