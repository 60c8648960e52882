"""Finding and reading Hugging Face GPT-2 checkpoints.

Safetensors files are memory-mapped and parsed here (the format is an 8-byte header length, a JSON header,
then raw little-endian tensors), so an F32 tensor becomes a numpy view of the mapped file: no second copy.
F16 and BF16 tensors are widened to float32 once at load. The model then converts the matrices into the
kernels' layout (gptcpp.quantize.convert_tensors) and the file pages behind each are let go as it goes;
a checkpoint written by gptcpp quantize is already in that layout and stays mapped, used in place."""
from __future__ import annotations

import json
import mmap
import os
import struct

import numpy as np

from .config import GPT2Config, load_config

BUNDLED_DIR = os.path.join(os.path.dirname(__file__), "bundled")

_DTYPES = {"F32": (np.float32, 4), "F16": (np.float16, 2), "BF16": (np.uint16, 2)}
# Only in checkpoints written by gptcpp.quantize (bf16 bits are stored as U16 there).
_RAW_DTYPES = {**_DTYPES, "I8": (np.int8, 1), "U8": (np.uint8, 1), "U16": (np.uint16, 2), "I32": (np.int32, 4)}
# Buffers some GPT-2 checkpoints carry that are not weights.
_IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias")


def _is_count(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


class CheckpointError(ValueError):
    """A checkpoint file is missing, truncated, malformed, or does not match its config."""


def bundled_models() -> list[str]:
    """Names of the models shipped inside the package, the language model first."""
    if not os.path.isdir(BUNDLED_DIR):
        return []
    names = sorted(d for d in os.listdir(BUNDLED_DIR)
                   if os.path.isfile(os.path.join(BUNDLED_DIR, d, "config.json")))
    return sorted(names, key=lambda n: ("draft" in n, n))


def resolve_model_dir(name_or_path: str) -> str:
    """A local directory, a bundled model name, or a Hugging Face hub id (downloaded into the usual cache)."""
    if os.path.isdir(name_or_path):
        return name_or_path
    if name_or_path in bundled_models():
        return os.path.join(BUNDLED_DIR, name_or_path)
    if os.path.exists(name_or_path):
        raise CheckpointError(f"{name_or_path} is not a directory (pass the folder that holds config.json)")
    return _download_from_hub(name_or_path)


def _download_from_hub(repo_id: str) -> str:
    try:
        from huggingface_hub import snapshot_download
    except ImportError:  # pragma: no cover - tokenizers brings huggingface_hub
        raise OSError(f"{repo_id!r} is not a local directory and huggingface_hub is not installed") from None
    patterns = ["config.json", "*.safetensors", "model.safetensors.index.json", "tokenizer.json",
                "vocab.json", "merges.txt", "generation_config.json"]
    try:
        return snapshot_download(repo_id=repo_id, allow_patterns=patterns)
    except Exception as e:  # network errors, unknown repos, offline mode: one clear message
        bundled = bundled_models()
        hint = f"; or use the bundled model {bundled[0]!r}" if bundled else ""
        raise OSError(
            f"could not load {repo_id!r}: it is not a local directory and downloading it from the Hugging Face hub "
            f"failed ({type(e).__name__}: {e}). Pass the path of a directory holding config.json, "
            f"model.safetensors and tokenizer.json{hint}.") from None


class SafetensorsFile:
    """One memory-mapped .safetensors file: tensor names -> numpy views of the mapping."""

    def __init__(self, path: str):
        self.path = path
        try:
            with open(path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                if size < 8:
                    raise CheckpointError(f"{path} is truncated (only {size} bytes)")
                self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except OSError as e:
            raise CheckpointError(f"cannot read {path}: {e}") from None
        (header_len,) = struct.unpack("<Q", self._map[:8])
        if header_len > size - 8:
            raise CheckpointError(f"{path} is truncated or not a safetensors file (header of {header_len} bytes "
                                  f"in a file of {size})")
        try:
            header = json.loads(bytes(self._map[8:8 + header_len]).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{path} has a corrupt safetensors header: {e}") from None
        if not isinstance(header, dict):
            raise CheckpointError(f"{path} has a corrupt safetensors header")
        self.metadata = header.pop("__metadata__", None) or {}
        if not isinstance(self.metadata, dict):
            raise CheckpointError(f"{path} has a corrupt safetensors header: __metadata__ is not an object")
        self._buffer = np.frombuffer(self._map, dtype=np.uint8)
        data_start = 8 + header_len
        self.entries = {}
        for name, info in header.items():
            try:
                dtype, shape, (begin, end) = info["dtype"], list(info["shape"]), info["data_offsets"]
            except (KeyError, TypeError, ValueError):
                raise CheckpointError(f"{path}: malformed header entry for tensor {name!r}") from None
            if not all(_is_count(v) for v in (begin, end, *shape)) or not isinstance(dtype, str):
                raise CheckpointError(f"{path}: malformed header entry for tensor {name!r}: {info}")
            if begin > end:
                raise CheckpointError(f"{path}: malformed header entry for tensor {name!r}: "
                                      f"data_offsets {begin} > {end}")
            if data_start + end > size:
                raise CheckpointError(f"{path} is truncated: tensor {name!r} ends at byte {data_start + end} "
                                      f"of a {size}-byte file")
            self.entries[name] = (dtype, shape, data_start + begin, data_start + end)

    def raw(self, name: str, allowed=_RAW_DTYPES) -> np.ndarray:
        """The tensor as stored: a view of the mapping, no copy (unless misaligned in the file)."""
        dtype, shape, begin, end = self.entries[name]
        if dtype not in allowed:
            raise CheckpointError(f"{self.path}: tensor {name!r} has dtype {dtype}; supported: {', '.join(allowed)}")
        np_dtype, itemsize = allowed[dtype]
        count = int(np.prod(shape)) if shape else 1
        if (end - begin) != count * itemsize:
            raise CheckpointError(f"{self.path}: tensor {name!r} holds {end - begin} bytes, but {dtype} {shape} "
                                  f"needs {count * itemsize}")
        arr = self._buffer[begin:end].view(np_dtype).reshape(shape)
        # A writer that did not align the data gets a copy: the C++ core is never handed misaligned values.
        return arr if arr.flags.aligned else arr.copy()

    def release(self, name: str) -> None:
        """Lets go of the pages of the mapping that only this tensor's data occupies, once it has been
        converted: they leave this process's resident memory (the mapping stays valid: a later read of them
        loads them from the file again)."""
        _, _, begin, end = self.entries[name]
        page = mmap.PAGESIZE
        start, stop = -(-begin // page) * page, end // page * page
        if stop > start and hasattr(mmap, "MADV_DONTNEED"):
            self._map.madvise(mmap.MADV_DONTNEED, start, stop - start)

    def tensor(self, name: str) -> np.ndarray:
        """The tensor as float32: a view of the mapping for F32, a converted copy for F16 / BF16."""
        dtype = self.entries[name][0]
        raw = self.raw(name, _DTYPES)
        if dtype == "F32":
            return raw
        if dtype == "F16":
            return raw.astype(np.float32)
        return (raw.astype(np.uint32) << 16).view(np.float32)  # bf16 is the top half of a float32


def _checkpoint_files(directory: str) -> dict[str, SafetensorsFile]:
    """Tensor name -> the file holding it, for a single-file or sharded safetensors checkpoint."""
    index = os.path.join(directory, "model.safetensors.index.json")
    single = os.path.join(directory, "model.safetensors")
    if os.path.isfile(index):
        try:
            with open(index, encoding="utf-8") as f:
                weight_map = json.load(f)["weight_map"]
        except (OSError, KeyError, TypeError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{index} is not a valid safetensors index: {e}") from None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise CheckpointError(f"{index} is not a valid safetensors index: weight_map must map tensor names "
                                  f"to shard file names")
        files, out = {}, {}
        for name, fname in weight_map.items():
            path = os.path.join(directory, fname)
            if path not in files:
                if not os.path.isfile(path):
                    raise CheckpointError(f"{index} names the shard {fname}, which is missing")
                files[path] = SafetensorsFile(path)
            if name not in files[path].entries:
                raise CheckpointError(f"{index} places tensor {name!r} in {fname}, which does not hold it")
            out[name] = files[path]
        return out
    if os.path.isfile(single):
        f = SafetensorsFile(single)
        return {name: f for name in f.entries}
    if os.path.isfile(os.path.join(directory, "pytorch_model.bin")):
        raise CheckpointError(f"{directory} holds only pytorch_model.bin; gptcpp reads safetensors. Convert it with "
                              "transformers: GPT2LMHeadModel.from_pretrained(dir).save_pretrained(dir)")
    raise FileNotFoundError(f"no model.safetensors or model.safetensors.index.json in {directory}")


def _canonical(name: str) -> str:
    return name[len("transformer."):] if name.startswith("transformer.") else name


def expected_shapes(cfg: GPT2Config) -> dict[str, tuple[int, ...]]:
    C, I, V = cfg.n_embd, cfg.inner_dim, cfg.vocab_size
    shapes = {"wte.weight": (V, C), "wpe.weight": (cfg.n_positions, C), "ln_f.weight": (C,), "ln_f.bias": (C,)}
    for i in range(cfg.n_layer):
        p = f"h.{i}."
        shapes.update({
            p + "ln_1.weight": (C,), p + "ln_1.bias": (C,), p + "ln_2.weight": (C,), p + "ln_2.bias": (C,),
            p + "attn.c_attn.weight": (C, 3 * C), p + "attn.c_attn.bias": (3 * C,),
            p + "attn.c_proj.weight": (C, C), p + "attn.c_proj.bias": (C,),
            p + "mlp.c_fc.weight": (C, I), p + "mlp.c_fc.bias": (I,),
            p + "mlp.c_proj.weight": (I, C), p + "mlp.c_proj.bias": (C,),
        })
    if not cfg.tie_word_embeddings:
        shapes["lm_head.weight"] = (V, C)
    return shapes


class LoadedTensors(dict):
    """Name -> array, as loaded; release(name) lets go of the file pages behind a tensor that has been
    converted (see SafetensorsFile.release)."""

    def __init__(self):
        super().__init__()
        self.sources = {}

    def release(self, name: str) -> None:
        if name in self.sources:
            f, stored_name = self.sources[name]
            f.release(stored_name)


def load_weights(directory: str, cfg: GPT2Config) -> tuple[LoadedTensors, dict]:
    """Arrays under the C++ model's names, checked against the config; and the files' metadata.

    A Hugging Face checkpoint gives float32 arrays (F32 a view of the mapped file). A checkpoint written by
    gptcpp.quantize (metadata "gptcpp.dtype") gives its stored arrays as they are: blocked matrices, scales."""
    files = _checkpoint_files(directory)
    metadata = {}
    for f in {id(f): f for f in files.values()}.values():
        metadata.update(f.metadata)
    by_name = {}
    for name, f in files.items():
        canon = _canonical(name)
        if canon.endswith(_IGNORED_SUFFIXES):
            continue
        by_name.setdefault(canon, (f, name))
    stored = metadata.get("gptcpp.dtype")
    if stored is not None:
        from .quantize import FORMAT_VERSION, OPTIONAL_SUFFIXES, readable_format, stored_shapes  # gptcpp's layouts
        version = metadata.get("gptcpp.format_version")
        if not readable_format(stored, version):
            raise CheckpointError(f"{directory}: a gptcpp {stored} checkpoint of format version {version}, but this "
                                  f"gptcpp reads version {FORMAT_VERSION}; quantize the original checkpoint again")
        expected = stored_shapes(cfg, stored)
    else:
        OPTIONAL_SUFFIXES = ()
        expected = {n: (s, None) for n, s in expected_shapes(cfg).items()}
    tensors = LoadedTensors()
    for canon, (shape, np_dtype) in expected.items():
        if canon not in by_name:
            if canon.endswith(OPTIONAL_SUFFIXES):
                continue
            raise CheckpointError(f"{directory}: tensor {canon!r} is missing from the checkpoint")
        f, name = by_name[canon]
        got = tuple(f.entries[name][1])
        if len(got) != len(shape) or any(want is not None and g != want for g, want in zip(got, shape)):
            raise CheckpointError(f"{directory}: tensor {name!r} has shape {list(got)}, but config.json implies "
                                  f"{list(shape)}")
        if np_dtype is None:
            arr = f.tensor(name)
        else:
            arr = f.raw(name)
            if arr.dtype != np_dtype:
                raise CheckpointError(f"{directory}: tensor {name!r} is {arr.dtype}, but a {stored} checkpoint "
                                      f"stores it as {np.dtype(np_dtype)}")
        if stored == "bf16" and arr.ndim == 4 and arr.ctypes.data % 64:
            # bf16's blocked pairs are read in place by AMX tiles, which want them line-aligned (aligned_empty);
            # the file puts tensors where their sizes fall
            from .quantize import aligned_copy
            tensors[canon] = aligned_copy(arr)
            f.release(name)
            continue
        tensors[canon] = np.ascontiguousarray(arr)
        tensors.sources[canon] = (f, name)
    return tensors, metadata


def load_checkpoint(name_or_path: str) -> tuple[str, GPT2Config, dict[str, np.ndarray], dict]:
    directory = resolve_model_dir(name_or_path)
    cfg = load_config(directory)
    tensors, metadata = load_weights(directory, cfg)
    return directory, cfg, tensors, metadata
