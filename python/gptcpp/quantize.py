"""Weight formats: fp32, fp16, bf16, int8 and int4, converted at load or written to a checkpoint.

Only the large matrices change format: the token embedding (which is also the tied LM head), and each
block's c_attn, attn.c_proj, mlp.c_fc and mlp.c_proj weights. Layer norms, biases and the position
embedding stay float32. Every format, fp32 included, stores the matrices in the kernels' blocked layout
(column blocks of 64, each a contiguous [K][64] run: decoding streams each block front to back, batches and
prefill read it without packing; bf16 in pairs of k, [K/2][64][2], as its dot products take them), and the
token embedding transposed, [n_embd, vocab], as the LM head's
[K, N] matrix (an embedding lookup gathers a token's column from it). A Hugging Face checkpoint is converted
when loaded; one written by `gptcpp quantize` (fp32 too) is already in this layout and is used in place.
- fp16 / bf16: IEEE half (F16C) / bfloat16 (the top 16 bits of a float32), rounded to nearest even; the kernels
  widen them to float32 exactly in registers, so compute is float32.
- int8: symmetric in groups of 32 along the input dimension, w = q * scale with one fp16 scale per group and
  output channel (max|w| / 127 over the group, rounded to fp16), q in [-127, 127]: 1.0625 bytes per weight.
  The kernels quantize the activations the same way per row on the fly and sum each group's products in
  int32 (VNNI's vpdpbusd where the CPU has it), so int8 compute is int8, not float32. Small groups keep GPT-2's
  few large-magnitude weights from costing the others their precision, but GPT-2's residual stream has a few
  channels far larger than the rest, in the token embedding and in every layer-normed activation that feeds
  the next matrix: a group holding one of them would lose its other members' precision, on the weight side
  and on the activation side. Those channels (found from the embedding's per-channel RMS) are kept out of the
  int8 product of the three matrices that read the residual stream (the LM head, c_attn, c_fc): their
  weight rows are stored in fp16 and multiplied in float32 (measured on the outlier test model: RMS logit
  error 1.8% without this, see the README for the figure with it). The token embedding is the LM head's
  weight too: its outlier channels are kept apart as well.
- int4: the blocks' matrices as int8 but with 4-bit values (q in [-7, 7], scale max|w| / 7 per group of 32),
  two per byte: 0.5625 bytes per weight. The token embedding / LM head (its 38.6M weights in gpt2 are a third
  of the model, and the logits are what sampling reads) takes 6-bit values (q in [-31, 31], scale max|w| / 31):
  0.8125 bytes per weight, a quarter fewer than int8 (in 4 bits the trained model's logit error rose from 0.7%
  to 4.7%; in 6 bits it is 1.2%)."""
from __future__ import annotations

import numpy as np

DTYPES = ("fp32", "fp16", "bf16", "int8", "int4")
# How the KV cache may store keys and values (model.GPT2's kv_cache_dtype).
KV_CACHE_DTYPES = ("fp32", "fp16")
_MATRIX_SUFFIXES = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def is_table(name: str) -> bool:
    """The token embedding / LM head [vocab, n_embd], stored transposed by every format."""
    return name in ("wte.weight", "lm_head.weight")


def is_matrix(name: str) -> bool:
    return is_table(name) or name.endswith(_MATRIX_SUFFIXES)


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


BLOCK_COLS = 64
GROUP = 32


def residual_outlier_channels(wte: np.ndarray) -> np.ndarray:
    """The residual stream's large-magnitude channels, read off the token embedding [vocab, n_embd]: those whose
    RMS over the vocabulary is over 4x the median channel's (at most n_embd / 16 of them), increasing."""
    squares = np.zeros(wte.shape[1], dtype=np.float64)
    for r0 in range(0, wte.shape[0], 4096):  # in slices: no float64 copy of the whole table
        squares += np.square(wte[r0:r0 + 4096], dtype=np.float64).sum(axis=0)
    rms = np.sqrt(squares / max(1, wte.shape[0]))
    big = np.flatnonzero(rms > 4.0 * np.median(rms))
    big = big[np.argsort(rms[big])[::-1][:max(1, wte.shape[1] // 16)]]
    return np.sort(big).astype(np.int32)


def matrix_bits(dtype: str) -> int:
    """Bits per value of the int8 / int4 formats' block matrices."""
    return 4 if dtype == "int4" else 8


def table_bits(dtype: str) -> int:
    """Bits per value of the int8 / int4 formats' token embedding / LM head."""
    return 6 if dtype == "int4" else 8


def quantize_int8(name: str, w: np.ndarray, outlier_rows=None, bits: int = 8) -> dict[str, np.ndarray]:
    """[K, N] float32 -> {name: q int8 [ceil(N/64), Kp/4, 64, 4], name.scale: fp16 [ceil(N/64), Kp/32, 64]}
    with Kp = K rounded up to 32, zero-padded: the layout of csrc/kernels/qmatmul.inl (each run of 4 consecutive
    k of one column is 4 adjacent bytes, so one register load holds 4 k of 16 or 8 columns). outlier_rows
    (increasing channel indices) are zeroed there and kept as name.outlier_rows (int32) and
    name.outlier_weights (fp16 [n, N]), multiplied in float32 by the kernel.
    bits=4: values in [-7, 7] with scale max|w| / 7, stored + 8, two per byte: uint8 [ceil(N/64), Kp/8, 64, 4],
    byte (n, k%4) of quad pair p holding quad 2p in its low nibble and quad 2p+1 in its high one.
    bits=6: values in [-31, 31] with scale max|w| / 31, stored + 32: uint8 [ceil(N/64), 3*Kp/16, 64, 4], per 16
    consecutive k (quads 4t..4t+3) three [64, 4] rows: int4's nibble pairs of the values' low 4 bits for quads
    4t, 4t+1 and 4t+2, 4t+3, then the top 2 bits of quad 4t+i at bits 2i, 2i+1."""
    if bits not in (8, 6, 4):
        raise ValueError(f"bits must be 8, 6 or 4, not {bits}")
    K, N = w.shape
    Kp, nb = -(-K // GROUP) * GROUP, -(-N // BLOCK_COLS)
    qmax = (1 << (bits - 1)) - 1
    out = {}
    rows = None
    if outlier_rows is not None and len(outlier_rows):
        rows = np.asarray(outlier_rows, dtype=np.int32)
        out[name + ".outlier_rows"] = rows
        out[name + ".outlier_weights"] = np.ascontiguousarray(_to_fp16(name, w[rows]))
    q_all = aligned_empty((nb, Kp * bits // 32, BLOCK_COLS, 4), np.int8 if bits == 8 else np.uint8)
    scale_all = aligned_empty((nb, Kp // GROUP, BLOCK_COLS), np.float16)
    # Columns go CHUNK blocks at a time (every step below is per column), so that the float temporaries stay a
    # few MB instead of several copies of the whole matrix (the embedding of gpt2 is 154 MB in float32).
    CHUNK = 16
    for b0 in range(0, nb, CHUNK):
        b1 = min(nb, b0 + CHUNK)
        c0, c1 = b0 * BLOCK_COLS, min(N, b1 * BLOCK_COLS)
        cols = (b1 - b0) * BLOCK_COLS
        padded = np.zeros((Kp, cols), dtype=np.float32)
        padded[:K, :c1 - c0] = w[:, c0:c1]
        if rows is not None:
            padded[rows] = 0.0
        groups = padded.reshape(Kp // GROUP, GROUP, cols)
        amax = np.abs(groups).max(axis=1)
        if not np.isfinite(amax).all() or amax.max(initial=0.0) / qmax > 65504:
            raise ValueError(f"tensor {name!r} has values beyond int{bits} with float16 scales (up to {amax.max():g})")
        scale = (amax / np.float32(qmax)).astype(np.float16)
        s32 = scale.astype(np.float32)
        with np.errstate(divide="ignore", invalid="ignore"):
            q = np.where(s32[:, None, :] > 0, np.rint(groups / s32[:, None, :]), 0.0)
        q = q.clip(-qmax, qmax).astype(np.int8).reshape(Kp // 4, 4, b1 - b0, BLOCK_COLS).transpose(2, 0, 3, 1)
        if bits == 4:
            pairs = (q + 8).astype(np.uint8).reshape(b1 - b0, Kp // 8, 2, BLOCK_COLS, 4)
            q = pairs[:, :, 0] | (pairs[:, :, 1] << np.uint8(4))
        elif bits == 6:
            u = (q + 32).astype(np.uint8).reshape(b1 - b0, Kp // 16, 4, BLOCK_COLS, 4)
            low, top = u & np.uint8(15), u >> np.uint8(4)
            q = np.stack([low[:, :, 0] | (low[:, :, 1] << np.uint8(4)), low[:, :, 2] | (low[:, :, 3] << np.uint8(4)),
                          top[:, :, 0] | (top[:, :, 1] << np.uint8(2)) | (top[:, :, 2] << np.uint8(4))
                          | (top[:, :, 3] << np.uint8(6))], axis=2).reshape(b1 - b0, Kp * 3 // 16, BLOCK_COLS, 4)
        q_all[b0:b1] = q
        scale_all[b0:b1] = scale.reshape(Kp // GROUP, b1 - b0, BLOCK_COLS).transpose(1, 0, 2)
    out[name] = q_all
    out[name + ".scale"] = scale_all
    return out


def dequantize_int8(tensors: dict, name: str, K: int, N: int) -> np.ndarray:
    """The [K, N] float32 matrix that quantize_int8's tensors (int8, int6 or int4) stand for."""
    q, scales = unpack_quads(tensors[name], K), tensors[name + ".scale"]
    nb, kq = q.shape[:2]
    w = q.transpose(1, 3, 0, 2).reshape(kq * 4, nb * BLOCK_COLS).astype(np.float32)
    s = scales.astype(np.float32).transpose(1, 0, 2).reshape(kq * 4 // GROUP, 1, nb * BLOCK_COLS)
    w = (w.reshape(kq * 4 // GROUP, GROUP, -1) * s).reshape(kq * 4, -1)[:K, :N]
    if name + ".outlier_rows" in tensors:
        w[tensors[name + ".outlier_rows"]] = tensors[name + ".outlier_weights"].astype(np.float32)
    return w


def unpack_quads(q: np.ndarray, K: int) -> np.ndarray:
    """quantize_int8's values of a [K, N] matrix as int8 quads [ceil(N/64), Kp/4, 64, 4] whatever their bits
    (int4 and int6 are both uint8, told apart by their second dimension)."""
    if q.dtype != np.uint8:
        return q
    nb, rows = q.shape[:2]
    Kp = -(-K // GROUP) * GROUP
    if rows == Kp // 8:  # int4: nibble pairs
        return (np.stack([q & np.uint8(15), q >> np.uint8(4)], axis=2).astype(np.int8) - 8).reshape(nb, Kp // 4, 64, 4)
    t = q.reshape(nb, Kp // 16, 3, BLOCK_COLS, 4)  # int6: two rows of nibble pairs, a row of top bits
    low = np.stack([t[:, :, 0] & np.uint8(15), t[:, :, 0] >> np.uint8(4), t[:, :, 1] & np.uint8(15),
                    t[:, :, 1] >> np.uint8(4)], axis=2)
    top = np.stack([(t[:, :, 2] >> np.uint8(2 * i)) & np.uint8(3) for i in range(4)], axis=2)
    return ((low | (top << np.uint8(4))).astype(np.int8) - 32).reshape(nb, Kp // 4, BLOCK_COLS, 4)


def aligned_empty(shape: tuple, dtype) -> np.ndarray:
    """An uninitialized C-contiguous array whose data starts on a 64-byte cache line. The kernels read blocked
    matrices in place (AMX tiles load bf16 pairs as stored): a block that is not line-aligned has every 64-byte
    row span two lines."""
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    raw = np.empty(nbytes + 64, dtype=np.uint8)
    start = -raw.ctypes.data % 64
    return raw[start:start + nbytes].view(dtype).reshape(shape)


def aligned_copy(a: np.ndarray) -> np.ndarray:
    out = aligned_empty(a.shape, a.dtype)
    out[...] = a
    return out


def to_blocked(w: np.ndarray, transpose: bool = False) -> np.ndarray:
    """[K, N] -> [ceil(N/64), K, 64]: column blocks, each contiguous, the last zero-padded (see
    csrc/kernels/matmul.inl). transpose: w is [N, K] (an embedding table) and w.T is blocked. Only the result
    is allocated, so converting a checkpoint needs no more than one extra copy of the tensor at hand.
    bf16 (uint16 bits) is blocked in pairs of k: [ceil(N/64), ceil(K/2), 64, 2], element (k, n) of a block at
    [k // 2, n % 64, k % 2], an odd K's last pair padded with a zero (csrc/kernels/kernels.h, kBf16Rows)."""
    N, K = w.shape if transpose else w.shape[::-1]
    nb, full = -(-N // BLOCK_COLS), N // BLOCK_COLS
    if w.dtype == np.uint16:
        return _blocked_pairs(w, transpose, K, nb)
    out = aligned_empty((nb, K, BLOCK_COLS), w.dtype)
    if transpose:
        out[:full] = w[:full * BLOCK_COLS].reshape(full, BLOCK_COLS, K).transpose(0, 2, 1)
    else:
        out[:full] = w[:, :full * BLOCK_COLS].reshape(K, full, BLOCK_COLS).transpose(1, 0, 2)
    if full < nb:
        out[full] = 0
        out[full, :, :N - full * BLOCK_COLS] = w[full * BLOCK_COLS:].T if transpose else w[:, full * BLOCK_COLS:]
    return out


def _blocked_pairs(w: np.ndarray, transpose: bool, K: int, nb: int) -> np.ndarray:
    out = aligned_empty((nb, (K + 1) // 2, BLOCK_COLS, 2), np.uint16)
    out[-1] = 0  # a partial last block's padding columns
    if K % 2:
        out[:, K // 2, :, 1] = 0  # an odd K's last pair
    for b in range(nb):  # a block at a time: one block's copy beside the result
        cols = w[b * BLOCK_COLS:(b + 1) * BLOCK_COLS].T if transpose else w[:, b * BLOCK_COLS:(b + 1) * BLOCK_COLS]
        n = cols.shape[1]
        out[b, :K // 2, :n] = cols[:K // 2 * 2].reshape(K // 2, 2, n).transpose(0, 2, 1)
        if K % 2:
            out[b, K // 2, :n, 0] = cols[K - 1]
    return out


def from_blocked(b: np.ndarray, n: int, k: int | None = None) -> np.ndarray:
    """The [K, n] matrix of a blocked one (bf16 pairs: K rounded up to even, unless k is given)."""
    if b.ndim == 4:  # bf16 in pairs of k
        nb, half, _, _ = b.shape
        b = b.transpose(0, 1, 3, 2).reshape(nb, 2 * half, BLOCK_COLS)
    nb, K, _ = b.shape
    return b.transpose(1, 0, 2).reshape(K, nb * BLOCK_COLS)[:k, :n]


def convert_tensors(tensors: dict[str, np.ndarray], dtype: str, release=None) -> dict[str, np.ndarray]:
    """float32 tensors -> the same names in `dtype`, matrices in the blocked layout (int8 adds '<name>.scale'
    tensors, and '<name>.outlier_rows' / '<name>.outlier_weights' where a matrix has outlier channels).
    release(name), if given, is called once a tensor has been converted: the loader lets go of the file pages
    behind it then, so that converting a memory-mapped checkpoint never holds it twice."""
    check_dtype(dtype)
    out = {}
    outliers = residual_outlier_channels(tensors["wte.weight"]) if dtype in ("int8", "int4") else None
    for name, t in tensors.items():
        table = is_table(name)
        if not is_matrix(name):
            # A copy, small: nothing then refers to a mapped file, which is unmapped once converted (the page
            # cache maps a mapped file in large folios: each small tensor left there kept up to 2 MB resident).
            out[name] = np.array(t, dtype=np.float32)
        elif dtype in ("int8", "int4"):
            # The LM head is int6 in the int4 format. It and the two matrices that read a layer-normed
            # residual stream keep its outlier channels apart.
            rows = outliers if table or name.endswith(("attn.c_attn.weight", "mlp.c_fc.weight")) else None
            out.update(quantize_int8(name, t.T if table else t, rows, table_bits(dtype) if table else matrix_bits(dtype)))
        else:
            narrow = t if dtype == "fp32" else to_bf16(t) if dtype == "bf16" else _to_fp16(name, t)
            out[name] = to_blocked(narrow, transpose=table)
        if release is not None:
            release(name)
    return out


# ---- checkpoints in a smaller format -----------------------------------------------------------------

# 2: int8 in groups of 32 (version 1 had a scale per channel; such files are refused).
# 3: fp32 / fp16 / bf16 token embeddings blocked and transposed, like int8's (int8 files of version 2 are the
#    same as version 3 and still read).
# 4: int4's token embedding / LM head in 6 bits instead of 8 (other formats' files of version 3, and int8's of
#    version 2, are the same as version 4 and still read; int4 files of versions 2 and 3 are refused).
# 5: bf16 matrices blocked in pairs of k (other formats' files of version 4 are the same and still read, with
#    those of version 3 as before; bf16 files of older versions are refused).
FORMAT_VERSION = "5"
OPTIONAL_SUFFIXES = (".outlier_rows", ".outlier_weights")


def readable_format(dtype: str, version) -> bool:
    if dtype == "bf16":
        return version == FORMAT_VERSION
    return (version in (FORMAT_VERSION, "4") or (version == "3" and dtype != "int4")
            or (version == "2" and dtype == "int8"))


def stored_shapes(cfg, dtype: str) -> dict:
    """name -> (shape, numpy dtype) of every tensor in a checkpoint written by save_quantized. Outlier tensors
    (OPTIONAL_SUFFIXES) may be absent, and their None dimension is the file's own outlier count."""
    from .loading import expected_shapes
    if dtype not in DTYPES:
        raise ValueError(f"unknown gptcpp.dtype {dtype!r} in the checkpoint's metadata")
    narrow = {"fp32": np.float32, "fp16": np.float16, "bf16": np.uint16, "int8": np.int8, "int4": np.uint8}[dtype]
    out = {}
    for name, shape in expected_shapes(cfg).items():
        table = is_table(name)
        if is_matrix(name):
            K, N = shape[::-1] if table else shape  # tables are stored transposed
            nb, Kp = -(-N // BLOCK_COLS), -(-K // GROUP) * GROUP
        if is_matrix(name) and dtype in ("int8", "int4"):
            b = table_bits(dtype) if table else matrix_bits(dtype)
            out[name] = ((nb, Kp * b // 32, BLOCK_COLS, 4), np.int8 if b == 8 else np.uint8)
            out[name + ".scale"] = ((nb, Kp // GROUP, BLOCK_COLS), np.float16)
            out[name + ".outlier_rows"] = ((None,), np.int32)
            out[name + ".outlier_weights"] = ((None, N), np.float16)
        elif is_matrix(name) and dtype == "bf16":
            out[name] = ((nb, (K + 1) // 2, BLOCK_COLS, 2), narrow)
        elif is_matrix(name):
            out[name] = ((nb, K, BLOCK_COLS), narrow)
        else:
            out[name] = (shape, np.float32)
    return out


def _align_data(path: str) -> None:
    """Pads a safetensors file's header with spaces (its JSON allows them) so that the data starts on a 64-byte
    line: a tensor at an offset that is a multiple of 64 (every blocked matrix's size is one) is then
    line-aligned where the file is mapped, as the kernels read blocked matrices in place (see aligned_empty)."""
    import os
    import shutil
    import struct
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = f.read(n)
        padded = n + (-(8 + n) % 64)
        if padded == n:
            return
        with open(path + ".tmp", "wb") as out:
            out.write(struct.pack("<Q", padded) + header + b" " * (padded - n))
            shutil.copyfileobj(f, out, 1 << 24)
    os.replace(path + ".tmp", path)


def save_quantized(src: str, dst: str, dtype: str) -> str:
    """Writes `src` (a checkpoint directory, bundled name or hub id) converted to `dtype` into directory
    `dst`: model.safetensors in the layout the kernels read (so loading needs no conversion), with
    metadata gptcpp.dtype, plus config.json and the tokenizer files. Returns dst. fp32 keeps every number and
    only changes the layout (blocked matrices: faster prefill and batches than the checkpoint's own)."""
    import json
    import os
    import shutil

    from safetensors.numpy import save_file

    from .loading import load_checkpoint

    check_dtype(dtype)
    directory, cfg, tensors, metadata = load_checkpoint(src)
    if metadata.get("gptcpp.dtype"):
        raise ValueError(f"{src} is already a gptcpp {metadata['gptcpp.dtype']} checkpoint; quantize the original")
    converted = convert_tensors(tensors, dtype)
    os.makedirs(dst, exist_ok=True)
    path = os.path.join(dst, "model.safetensors")
    save_file({k: np.ascontiguousarray(v) for k, v in converted.items()}, path,
              metadata={"format": "gptcpp", "gptcpp.dtype": dtype, "gptcpp.format_version": FORMAT_VERSION})
    _align_data(path)
    with open(os.path.join(dst, "config.json"), "w", encoding="utf-8") as f:
        json.dump({**cfg.extra, **cfg.to_dict(), "model_type": "gpt2"}, f, indent=2)
    for name in ("tokenizer.json", "vocab.json", "merges.txt", "generation_config.json"):
        if os.path.isfile(os.path.join(directory, name)):
            shutil.copy(os.path.join(directory, name), os.path.join(dst, name))
    return dst
