"""Weight formats smaller than float32: fp16, bf16 and int8, converted at load or written to a checkpoint.

Only the large matrices change format: the token embedding (which is also the tied LM head), and each
block's c_attn, attn.c_proj, mlp.c_fc and mlp.c_proj weights. Layer norms, biases and the position
embedding stay float32. The kernels widen the stored values to float32 exactly, so compute is float32:
- fp16 / bf16: IEEE half (F16C) / bfloat16 (the top 16 bits of a float32), rounded to nearest even.
- int8: symmetric per output channel, w = q * scale with scale = max|w| / 127 over that channel (a column
  of a Conv1D [in, out] weight). The token embedding / LM head stays fp16 in this format: its rows are
  dominated by GPT-2's few large-magnitude channels, and a per-row int8 scale set by them costs the other
  channels most of their precision (measured: 2.0% RMS logit error against 0.9% with an fp16 table)."""
from __future__ import annotations

import numpy as np

DTYPES = ("fp32", "fp16", "bf16", "int8")
BYTES_PER_WEIGHT = {"fp32": 4, "fp16": 2, "bf16": 2, "int8": 1}
_MATRIX_SUFFIXES = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def is_matrix(name: str) -> bool:
    return name in ("wte.weight", "lm_head.weight") or name.endswith(_MATRIX_SUFFIXES)


def _to_fp16(name: str, t: np.ndarray) -> np.ndarray:
    big = float(np.abs(t).max()) if t.size else 0.0
    if big > 65504:
        raise ValueError(f"tensor {name!r} has values up to {big:g}, beyond float16's range; use bf16")
    return t.astype(np.float16)


def check_dtype(dtype: str) -> str:
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    return dtype


def to_bf16(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bits (uint16), rounding to nearest even."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    return ((u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)).astype(np.uint16)


def bf16_to_f32(h: np.ndarray) -> np.ndarray:
    return (h.astype(np.uint32) << np.uint32(16)).view(np.float32)


def quantize_int8(w: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 with one scale per slice along `axis` reduced away (axis=0: per column)."""
    amax = np.abs(w).max(axis=axis)
    scale = (np.where(amax > 0, amax, 1.0) / 127.0).astype(np.float32)
    q = np.rint(w / (scale if axis == 0 else scale[:, None])).clip(-127, 127).astype(np.int8)
    return q, scale


BLOCK_COLS = 64


def to_blocked(w: np.ndarray) -> np.ndarray:
    """[K, N] -> [ceil(N/64), K, 64]: column blocks, each contiguous, the last zero-padded. Decoding reads
    each block front to back (see csrc/kernels/matmul.inl)."""
    K, N = w.shape
    nb = -(-N // BLOCK_COLS)
    padded = np.zeros((K, nb * BLOCK_COLS), dtype=w.dtype)
    padded[:, :N] = w
    return np.ascontiguousarray(padded.reshape(K, nb, BLOCK_COLS).transpose(1, 0, 2))


def from_blocked(b: np.ndarray, n: int) -> np.ndarray:
    nb, K, _ = b.shape
    return b.transpose(1, 0, 2).reshape(K, nb * BLOCK_COLS)[:, :n]


def convert_tensors(tensors: dict[str, np.ndarray], dtype: str) -> dict[str, np.ndarray]:
    """float32 tensors -> the same names in `dtype` (int8 adds '<name>.scale' vectors)."""
    check_dtype(dtype)
    if dtype == "fp32":
        return tensors
    out = {}
    for name, t in tensors.items():
        if not is_matrix(name):
            out[name] = t
        elif name in ("wte.weight", "lm_head.weight"):
            # [vocab, n_embd] rows are read whole by the LM head: row-major suits it. int8 keeps it fp16.
            out[name] = to_bf16(t) if dtype == "bf16" else _to_fp16(name, t)
        elif dtype == "int8":
            q, out[name + ".scale"] = quantize_int8(t, 0)  # Conv1D [in, out]: a scale per column
            out[name] = to_blocked(q)
        else:
            out[name] = to_blocked(to_bf16(t) if dtype == "bf16" else _to_fp16(name, t))
    return out
