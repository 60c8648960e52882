"""Checkpoint loading: every layout transformers writes (with / without the `transformer.` prefix, F32 / F16
/ BF16, sharded / single file, tied / untied head, attention-mask buffers, n_ctx, n_inner) gives transformers'
logits; matrices are converted into the kernels' layout without holding the file twice, the rest used in place
from the memory map; every bad input fails with a clear exception."""
import copy
import json
import os
import shutil
import struct

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

import gptcpp
from gptcpp import CheckpointError, ConfigError
from gptcpp.config import GPT2Config, load_config
from gptcpp.loading import SafetensorsFile, load_checkpoint
from gptcpp.quantize import from_blocked
from conftest import random_gpt2, reaches_mmap, rng_ids, save, torch_logits

TOL = 1e-4


# ---- helpers -----------------------------------------------------------------------------------------------
def st_header(path):
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(n))


def st_dtypes(directory):
    out = {}
    for fname in os.listdir(directory):
        if fname.endswith(".safetensors"):
            out.update({k: v["dtype"] for k, v in st_header(os.path.join(directory, fname)).items()
                        if k != "__metadata__"})
    return out


def rewrite(directory, edit, fname="model.safetensors"):
    """Loads a safetensors file as numpy, lets `edit(dict)` change it, writes it back."""
    path = os.path.join(directory, fname)
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def edit_config(directory, **changes):
    path = os.path.join(directory, "config.json")
    with open(path) as f:
        cfg = json.load(f)
    for k, v in changes.items():
        if v is _DELETE:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    with open(path, "w") as f:
        json.dump(cfg, f)


_DELETE = object()


def copy_ckpt(src, dst):
    shutil.copytree(src, dst)
    return str(dst)


def assert_matches(path, ref_model, lengths=(1, 9, 40)):
    model = gptcpp.GPT2.from_pretrained(path)
    for n in lengths:
        ids = rng_ids(n, model.config.vocab_size, seed=n)
        got, ref = model.logits(ids), torch_logits(ref_model, ids)
        assert got.shape == ref.shape and got.dtype == np.float32
        err = np.abs(got - ref).max()
        assert err <= TOL, f"{path} len={n}: max |diff| {err}"
    return model


@pytest.fixture(scope="module")
def base():
    return random_gpt2(seed=4)


@pytest.fixture(scope="module")
def saved(base, tmp_path_factory):
    return save(base, tmp_path_factory.mktemp("lm"))


# ---- layouts that load -------------------------------------------------------------------------------------
def test_lm_head_model_save_has_prefix_and_matches(base, saved):
    names = [k for k in st_header(os.path.join(saved, "model.safetensors")) if k != "__metadata__"]
    assert names and all(k.startswith("transformer.") for k in names)
    model = assert_matches(saved, base)
    assert model.metadata.get("format") == "pt"
    assert model.config.n_positions == 128 and model.config.inner_dim == 128


def test_gpt2model_save_without_prefix_matches(base, tmp_path):
    path = save(base.transformer, tmp_path / "base")  # GPT2Model: tensor names without `transformer.`
    names = [k for k in st_header(os.path.join(path, "model.safetensors")) if k != "__metadata__"]
    assert "wte.weight" in names and not any(k.startswith("transformer.") for k in names)
    assert_matches(path, base)


def test_keys_renamed_by_hand_without_prefix(base, saved, tmp_path):
    path = copy_ckpt(saved, tmp_path / "renamed")

    def strip(t):
        for k in list(t):
            t[k[len("transformer."):]] = t.pop(k)
    rewrite(path, strip)
    assert "wte.weight" in st_header(os.path.join(path, "model.safetensors"))
    assert_matches(path, base)


@pytest.mark.parametrize("dtype,torch_dtype", [("F16", torch.float16), ("BF16", torch.bfloat16)])
@pytest.mark.parametrize("prefix", [True, False])
def test_half_precision_checkpoints(base, tmp_path, dtype, torch_dtype, prefix):
    half = copy.deepcopy(base).to(torch_dtype)
    path = save(half if prefix else half.transformer, tmp_path / "half")
    assert set(st_dtypes(path).values()) == {dtype}
    # reference: transformers in float32 on the same rounded weights
    ref = copy.deepcopy(half).float().eval()
    model = assert_matches(path, ref)
    for name, arr in model._tensors.items():
        assert arr.dtype == np.float32 and arr.flags.c_contiguous, name
        assert not reaches_mmap(arr), f"{name}: {dtype} must be converted, not mapped"
    # the rounding really happened: not the float32 weights
    wte = from_blocked(model._tensors["wte.weight"], model.config.vocab_size).T
    assert not np.array_equal(wte, base.transformer.wte.weight.detach().numpy())
    np.testing.assert_array_equal(wte, ref.transformer.wte.weight.detach().numpy())


def test_half_precision_loaded_back_by_transformers(base, tmp_path):
    """The same file read by transformers itself, upcast to float32, gives the same logits."""
    import transformers
    path = save(copy.deepcopy(base).half(), tmp_path / "f16")
    ref = transformers.GPT2LMHeadModel.from_pretrained(path).float().eval()
    assert_matches(path, ref, lengths=(17,))


def mapped_rss(path):
    """Bytes of this process's resident memory in mappings of the file at path (/proc/self/smaps)."""
    total, inside = 0, False
    with open("/proc/self/smaps") as f:
        for line in f:
            fields = line.split()
            if "-" in fields[0] and len(fields) >= 5 and ":" in fields[3]:  # a mapping's header line
                inside = fields[-1] == os.path.realpath(path)
            elif inside and fields[0] == "Rss:":
                total += int(fields[1]) * 1024
    return total


@pytest.mark.skipif(not os.path.exists("/proc/self/smaps"), reason="needs /proc/self/smaps")
def test_f32_matrices_converted_without_holding_the_file(tmp_path):
    """A Hugging Face F32 checkpoint: the matrices go into the kernels' blocked layout, the small tensors are
    copied, the file pages behind each converted matrix leave resident memory as it is converted (so that
    loading never holds the weights twice: peak RSS near the file's size, not double), and the file is
    unmapped at the end."""
    m = random_gpt2(seed=12, vocab_size=3000, n_embd=256, n_layer=2, n_head=4)
    path = save(m, tmp_path / "big")
    assert set(st_dtypes(path).values()) == {"F32"}
    file = os.path.join(path, "model.safetensors")
    model = assert_matches(path, m, lengths=(9,))
    for name, arr in model._tensors.items():  # blocked matrices: a line-aligned view of their own buffer
        assert not reaches_mmap(arr), name
        assert arr.flags.owndata or (arr.base.flags.owndata and arr.ctypes.data % 64 == 0), name
    assert model._tensors["wte.weight"].shape == (-(-3000 // 64), 256, 64)
    assert mapped_rss(file) == 0  # nothing refers to the mapping any more: unmapped
    # while loading: the pages behind each converted matrix are let go as soon as it is converted
    from gptcpp.loading import load_weights
    from gptcpp.quantize import convert_tensors
    tensors, _ = load_weights(path, model.config)
    most = convert_tensors(tensors, "fp32", release=tensors.release)
    assert mapped_rss(file) < 0.1 * os.path.getsize(file), (mapped_rss(file), os.path.getsize(file))
    del most


def test_quantized_fp32_checkpoint_is_used_in_place(saved, tmp_path):
    from gptcpp.quantize import save_quantized
    dst = save_quantized(saved, str(tmp_path / "fp32"), "fp32")
    model = gptcpp.GPT2.from_pretrained(dst)
    for name, arr in model._tensors.items():
        assert not arr.flags.owndata and reaches_mmap(arr), f"{name} was copied out of the memory map"
        assert arr.dtype == np.float32 and arr.flags.c_contiguous and not arr.flags.writeable
        assert arr.ndim != 3 or arr.ctypes.data % 64 == 0, f"{name}: a blocked matrix off its cache lines"


def test_mixed_f32_and_f16_tensors(base, saved, tmp_path):
    path = copy_ckpt(saved, tmp_path / "mixed")
    rewrite(path, lambda t: t.update({"transformer.wte.weight": t["transformer.wte.weight"].astype(np.float16)}))
    ref = copy.deepcopy(base)
    with torch.no_grad():
        ref.transformer.wte.weight.copy_(ref.transformer.wte.weight.half().float())
    model = assert_matches(path, ref)
    assert not any(reaches_mmap(a) for a in model._tensors.values())


@pytest.mark.parametrize("half", [False, True])
@pytest.mark.parametrize("prefix", [True, False])
def test_sharded_checkpoint(base, tmp_path, half, prefix):
    m = copy.deepcopy(base).half() if half else base
    path = save(m if prefix else m.transformer, tmp_path / "sharded", max_shard_size="50KB")
    shards = [f for f in os.listdir(path) if f.endswith(".safetensors")]
    assert os.path.isfile(os.path.join(path, "model.safetensors.index.json")) and len(shards) > 1
    assert not os.path.exists(os.path.join(path, "model.safetensors"))
    assert_matches(path, copy.deepcopy(m).float().eval())


def test_untied_lm_head(tmp_path):
    m = random_gpt2(seed=8, tie_word_embeddings=False)
    assert not torch.equal(m.lm_head.weight, m.transformer.wte.weight)
    path = save(m, tmp_path / "untied")
    assert "lm_head.weight" in st_header(os.path.join(path, "model.safetensors"))
    model = assert_matches(path, m)
    assert model.config.tie_word_embeddings is False and "lm_head.weight" in model._tensors
    # the head really is read: transformers with the head swapped for wte gives other logits
    ids = rng_ids(5, 211)
    tied = copy.deepcopy(m)
    with torch.no_grad():
        tied.lm_head.weight.copy_(m.transformer.wte.weight)
    assert np.abs(model.logits(ids) - torch_logits(tied, ids)).max() > 1e-2


def test_untied_lm_head_sharded_without_prefix(tmp_path):
    m = random_gpt2(seed=9, tie_word_embeddings=False)
    path = save(m, tmp_path / "untied", max_shard_size="50KB")
    with open(os.path.join(path, "model.safetensors.index.json")) as f:
        index = json.load(f)
    weight_map = {(k[len("transformer."):] if k.startswith("transformer.") else k): v
                  for k, v in index["weight_map"].items()}
    for shard in set(index["weight_map"].values()):
        rewrite(path, lambda t: [t.__setitem__(k[len("transformer."):], t.pop(k)) for k in list(t)
                                 if k.startswith("transformer.")], fname=shard)
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": index.get("metadata", {}), "weight_map": weight_map}, f)
    assert_matches(path, m)


def test_tied_checkpoint_that_also_stores_lm_head(base, saved, tmp_path):
    """Older checkpoints store lm_head.weight although it is tied: it equals wte and is not needed."""
    path = copy_ckpt(saved, tmp_path / "both")
    rewrite(path, lambda t: t.update({"lm_head.weight": t["transformer.wte.weight"].copy()}))
    model = assert_matches(path, base)
    assert "lm_head.weight" not in model._tensors


def test_untied_config_without_lm_head_is_refused(base, saved, tmp_path):
    path = copy_ckpt(saved, tmp_path / "nohead")
    edit_config(path, tie_word_embeddings=False)
    with pytest.raises(CheckpointError, match=r"tensor 'lm_head.weight' is missing"):
        gptcpp.GPT2.from_pretrained(path)


@pytest.mark.parametrize("mask_dtype", [np.float32, np.bool_, np.uint8])
@pytest.mark.parametrize("prefix", ["transformer.", ""])
def test_attention_mask_buffers_in_the_file_are_ignored(base, saved, tmp_path, mask_dtype, prefix):
    """GPT-2 checkpoints from the hub carry h.N.attn.bias (the causal mask) and h.N.attn.masked_bias."""
    path = copy_ckpt(saved, tmp_path / "buffers")
    n = base.config.n_positions

    def add(t):
        if not prefix:
            for k in list(t):
                t[k[len("transformer."):]] = t.pop(k)
        for i in range(base.config.n_layer):
            t[f"{prefix}h.{i}.attn.bias"] = np.tril(np.ones((n, n), mask_dtype))[None, None]
            t[f"{prefix}h.{i}.attn.masked_bias"] = np.array(-1e4, np.float32)
    rewrite(path, add)
    assert f"{prefix}h.1.attn.masked_bias" in st_header(os.path.join(path, "model.safetensors"))
    model = assert_matches(path, base)
    assert not any(k.endswith(("attn.bias", "attn.masked_bias")) and "c_attn" not in k for k in model._tensors)


def test_config_with_n_ctx_instead_of_n_positions(base, saved, tmp_path):
    path = copy_ckpt(saved, tmp_path / "n_ctx")
    edit_config(path, n_positions=_DELETE, n_ctx=128)
    model = assert_matches(path, base, lengths=(1, 128))
    assert model.config.n_positions == 128
    with pytest.raises(ValueError, match="context of 128"):
        model.logits([0] * 129)


def test_n_positions_wins_over_n_ctx(base, saved, tmp_path):
    path = copy_ckpt(saved, tmp_path / "both")
    edit_config(path, n_ctx=1024)
    assert gptcpp.GPT2.from_pretrained(path).config.n_positions == 128


@pytest.mark.parametrize("n_inner", [None, 50, 200])
def test_n_inner(tmp_path, n_inner):
    m = random_gpt2(seed=3, n_inner=n_inner)
    path = save(m, tmp_path / "inner")
    with open(os.path.join(path, "config.json")) as f:
        assert json.load(f)["n_inner"] == n_inner
    model = assert_matches(path, m)
    assert model.config.n_inner == n_inner
    assert model.config.inner_dim == (n_inner or 4 * 32)
    assert model._tensors["h.0.mlp.c_fc.weight"].shape == (-(-(n_inner or 128) // 64), 32, 64)


def test_config_with_transformers_generic_names(tmp_path):
    """hidden_size / num_attention_heads / num_hidden_layers / max_position_embeddings (GPT2Config's
    attribute_map) mean what they mean in transformers; n_head in particular changes no tensor shape, so
    ignoring it would compute silently wrong logits."""
    import transformers
    m = random_gpt2(seed=6, n_head=8, n_embd=48, n_layer=3, n_positions=64)
    path = save(m, tmp_path / "aliases")
    edit_config(path, n_head=_DELETE, n_embd=_DELETE, n_layer=_DELETE, n_positions=_DELETE, hidden_size=48,
                num_attention_heads=8, num_hidden_layers=3, max_position_embeddings=64)
    hf = transformers.GPT2Config.from_pretrained(path)
    assert (hf.n_embd, hf.n_head, hf.n_layer, hf.n_positions) == (48, 8, 3, 64)
    model = assert_matches(path, m, lengths=(1, 30, 64))
    assert (model.config.n_embd, model.config.n_head, model.config.n_layer, model.config.n_positions) == \
        (48, 8, 3, 64)
    assert not set(model.config.extra) & {"hidden_size", "num_attention_heads"}
    # as in transformers, the generic name wins over the GPT-2 one
    edit_config(path, n_head=4)
    assert gptcpp.GPT2.from_pretrained(path).config.n_head == 8 == transformers.GPT2Config.from_pretrained(path).n_head


def test_unaligned_f32_data_loads(base, saved, tmp_path):
    """A writer that does not pad the header leaves float32 data at odd offsets: still loaded correctly, and
    the C++ core is never handed a misaligned float array."""
    path = copy_ckpt(saved, tmp_path / "unaligned")
    tensors = load_file(os.path.join(path, "model.safetensors"))
    header, data = {}, b""
    for k, v in tensors.items():
        header[k] = {"dtype": "F32", "shape": list(v.shape), "data_offsets": [len(data), len(data) + v.nbytes]}
        data += v.tobytes()
    h = json.dumps(header).encode()
    h += b" " * (1 + (len(h) % 2 == 0))  # 8 + len(h) odd
    assert (8 + len(h)) % 4
    with open(os.path.join(path, "model.safetensors"), "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h + data)
    model = assert_matches(path, base)
    assert all(a.flags.aligned and a.ctypes.data % 4 == 0 for a in model._tensors.values())


def test_config_without_optional_fields_uses_gpt2_defaults(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    cfg = load_config(str(tmp_path))
    assert (cfg.vocab_size, cfg.n_positions, cfg.n_embd, cfg.n_layer, cfg.n_head) == (50257, 1024, 768, 12, 12)
    assert cfg.inner_dim == 3072 and cfg.activation_function == "gelu_new" and cfg.tie_word_embeddings


def test_load_checkpoint_returns_directory_config_tensors(saved):
    directory, cfg, tensors, metadata = load_checkpoint(saved)
    assert directory == saved and isinstance(cfg, GPT2Config)
    assert len(tensors) == 4 + 12 * cfg.n_layer and metadata == {"format": "pt"}


# ---- config.json errors ------------------------------------------------------------------------------------
def test_missing_config_json(saved, tmp_path):
    path = copy_ckpt(saved, tmp_path / "noconfig")
    os.remove(os.path.join(path, "config.json"))
    with pytest.raises(FileNotFoundError, match=r"no config\.json in .*noconfig"):
        gptcpp.GPT2.from_pretrained(path)


@pytest.mark.parametrize("text", ['{"n_embd": 32,', "", "\xff\xfe", "not json"])
def test_invalid_json_config(saved, tmp_path, text):
    path = copy_ckpt(saved, tmp_path / "badjson")
    with open(os.path.join(path, "config.json"), "w", encoding="latin-1") as f:
        f.write(text)
    with pytest.raises(ConfigError, match=r"config\.json is not valid JSON"):
        gptcpp.GPT2.from_pretrained(path)


def test_config_that_is_not_an_object(saved, tmp_path):
    path = copy_ckpt(saved, tmp_path / "list")
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump([1, 2], f)
    with pytest.raises(ConfigError, match="does not hold a JSON object"):
        gptcpp.GPT2.from_pretrained(path)


@pytest.mark.parametrize("changes,match", [
    (dict(activation_function="gelu_10"), r"activation_function 'gelu_10' is not supported"),
    (dict(activation_function="leaky_relu"), r"activation_function 'leaky_relu' is not supported"),
    (dict(n_head=5), r"n_embd \(32\) is not divisible by n_head \(5\)"),
    (dict(model_type="gpt_neo"), r"model_type 'gpt_neo' is not supported"),
    (dict(model_type="llama"), r"model_type 'llama' is not supported"),
    (dict(add_cross_attention=True), r"add_cross_attention"),
    (dict(vocab_size=0), r"vocab_size must be a positive integer, got 0"),
    (dict(n_layer="2"), r"n_layer must be a positive integer, got '2'"),
    (dict(n_embd=32.0), r"n_embd must be a positive integer, got 32.0"),
    (dict(n_head=True), r"n_head must be a positive integer, got True"),
    (dict(n_positions=-1), r"n_positions must be a positive integer, got -1"),
    (dict(n_positions=_DELETE, n_ctx=0), r"n_positions must be a positive integer, got 0"),
    (dict(n_inner=0), r"n_inner must be a positive integer, got 0"),
    (dict(layer_norm_epsilon=0), r"layer_norm_epsilon must be a positive number, got 0"),
    (dict(layer_norm_epsilon="1e-5"), r"layer_norm_epsilon must be a positive number"),
    (dict(scale_attn_weights="yes"), r"scale_attn_weights must be true or false, got 'yes'"),
    (dict(tie_word_embeddings=None), r"tie_word_embeddings must be true or false, got None"),
    (dict(eos_token_id=500), r"eos_token_id 500 is outside the vocabulary \(0\.\.210\)"),
    (dict(eos_token_id=[1, -1]), r"eos_token_id -1 is outside the vocabulary"),
])
def test_bad_config_values(saved, tmp_path, changes, match):
    path = copy_ckpt(saved, tmp_path / "badcfg")
    edit_config(path, **changes)
    with pytest.raises(ConfigError, match=match) as info:
        gptcpp.GPT2.from_pretrained(path)
    assert "config.json" in str(info.value)
    assert isinstance(info.value, ValueError)


def test_unsupported_activation_message_lists_the_supported_ones(saved, tmp_path):
    path = copy_ckpt(saved, tmp_path / "act")
    edit_config(path, activation_function="gelu_10")
    with pytest.raises(ConfigError) as info:
        gptcpp.GPT2.from_pretrained(path)
    msg = str(info.value)
    assert "activation_function" in msg and "'gelu_10'" in msg and "gelu_new" in msg and "quick_gelu" in msg


def test_config_contradicting_tensors(saved, tmp_path):
    """config.json says n_embd 64 while the tensors are 32 wide."""
    path = copy_ckpt(saved, tmp_path / "wide")
    edit_config(path, n_embd=64)
    with pytest.raises(CheckpointError, match=r"tensor 'transformer\.wte\.weight' has shape \[211, 32\], but "
                                              r"config\.json implies \[211, 64\]"):
        gptcpp.GPT2.from_pretrained(path)


@pytest.mark.parametrize("changes,match", [
    (dict(vocab_size=300), r"'transformer\.wte\.weight' has shape \[211, 32\], but config\.json implies \[300, 32\]"),
    (dict(n_positions=256), r"'transformer\.wpe\.weight' has shape \[128, 32\].*\[256, 32\]"),
    (dict(n_inner=64), r"'transformer\.h\.0\.mlp\.c_fc\.weight' has shape \[32, 128\].*\[32, 64\]"),
    (dict(n_layer=3), r"tensor 'h\.2\.ln_1\.weight' is missing from the checkpoint"),
])
def test_other_config_tensor_contradictions(saved, tmp_path, changes, match):
    path = copy_ckpt(saved, tmp_path / "contra")
    edit_config(path, **changes)
    with pytest.raises(CheckpointError, match=match):
        gptcpp.GPT2.from_pretrained(path)


# ---- checkpoint file errors --------------------------------------------------------------------------------
def test_missing_model_safetensors(saved, tmp_path):
    path = copy_ckpt(saved, tmp_path / "noweights")
    os.remove(os.path.join(path, "model.safetensors"))
    with pytest.raises(FileNotFoundError, match=r"no model\.safetensors or model\.safetensors\.index\.json in"):
        gptcpp.GPT2.from_pretrained(path)


def test_pytorch_model_bin_only(base, saved, tmp_path):
    path = copy_ckpt(saved, tmp_path / "bin")
    os.remove(os.path.join(path, "model.safetensors"))
    torch.save(base.state_dict(), os.path.join(path, "pytorch_model.bin"))
    with pytest.raises(CheckpointError, match=r"holds only pytorch_model\.bin; gptcpp reads safetensors\. "
                                              r"Convert it"):
        gptcpp.GPT2.from_pretrained(path)


@pytest.mark.parametrize("cut", [1, 100, 4000])
def test_truncated_file(saved, tmp_path, cut):
    path = copy_ckpt(saved, tmp_path / "cut")
    f = os.path.join(path, "model.safetensors")
    size = os.path.getsize(f)
    os.truncate(f, size - cut)
    with pytest.raises(CheckpointError, match=r"model\.safetensors is truncated: tensor '.*' ends at byte \d+ of a "
                                              rf"{size - cut}-byte file"):
        gptcpp.GPT2.from_pretrained(path)


@pytest.mark.parametrize("size", [0, 4, 7])
def test_tiny_file(saved, tmp_path, size):
    path = copy_ckpt(saved, tmp_path / "tiny")
    f = os.path.join(path, "model.safetensors")
    os.truncate(f, size)
    with pytest.raises(CheckpointError, match=rf"model\.safetensors is truncated \(only {size} bytes\)"):
        gptcpp.GPT2.from_pretrained(path)


def test_file_cut_inside_the_header(saved, tmp_path):
    path = copy_ckpt(saved, tmp_path / "cuthdr")
    f = os.path.join(path, "model.safetensors")
    os.truncate(f, 50)
    with pytest.raises(CheckpointError, match=r"truncated or not a safetensors file \(header of \d+ bytes in a "
                                              r"file of 50\)"):
        gptcpp.GPT2.from_pretrained(path)


def _patch(path, offset, data):
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def test_corrupt_header_json(saved, tmp_path):
    path = copy_ckpt(saved, tmp_path / "corrupt")
    f = os.path.join(path, "model.safetensors")
    _patch(f, 8, b"#")  # the opening brace of the JSON header
    with pytest.raises(CheckpointError, match=r"model\.safetensors has a corrupt safetensors header"):
        gptcpp.GPT2.from_pretrained(path)
    _patch(f, 8, b"{")
    _patch(f, 20, b"\xff\xfe")  # invalid UTF-8
    with pytest.raises(CheckpointError, match=r"corrupt safetensors header"):
        gptcpp.GPT2.from_pretrained(path)


def test_not_a_safetensors_file(saved, tmp_path):
    path = copy_ckpt(saved, tmp_path / "text")
    with open(os.path.join(path, "model.safetensors"), "wb") as f:
        f.write(b"this is not a safetensors file at all" * 3)
    with pytest.raises(CheckpointError, match=r"truncated or not a safetensors file"):
        gptcpp.GPT2.from_pretrained(path)


def _write_raw(path, header, data=b""):
    h = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h + data)


@pytest.mark.parametrize("header,match", [
    ([1, 2, 3], r"corrupt safetensors header"),
    ({"__metadata__": "pt"}, r"corrupt safetensors header: __metadata__ is not an object"),
    ({"wte.weight": {"dtype": "F32", "shape": [2]}}, r"malformed header entry for tensor 'wte\.weight'"),
    ({"wte.weight": {"dtype": "F32", "shape": [2], "data_offsets": [0]}}, r"malformed header entry"),
    ({"wte.weight": "F32"}, r"malformed header entry"),
    ({"wte.weight": {"dtype": "F32", "shape": 2, "data_offsets": [0, 8]}}, r"malformed header entry"),
    ({"wte.weight": {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}}, r"malformed.*data_offsets 8 > 0"),
    ({"wte.weight": {"dtype": "F32", "shape": [2], "data_offsets": ["0", "8"]}}, r"malformed header entry"),
    ({"wte.weight": {"dtype": "F32", "shape": [2], "data_offsets": [-8, 0]}}, r"malformed header entry"),
    ({"wte.weight": {"dtype": "F32", "shape": [2], "data_offsets": [0.0, 8.0]}}, r"malformed header entry"),
    ({"wte.weight": {"dtype": "F32", "shape": ["a"], "data_offsets": [0, 8]}}, r"malformed header entry"),
    ({"wte.weight": {"dtype": "F32", "shape": [-1, -2], "data_offsets": [0, 8]}}, r"malformed header entry"),
    ({"wte.weight": {"dtype": 4, "shape": [2], "data_offsets": [0, 8]}}, r"malformed header entry"),
    ({"wte.weight": {"dtype": "F32", "shape": [2], "data_offsets": [0, 800]}}, r"is truncated: tensor 'wte\.weight'"),
])
def test_malformed_header_entries(tmp_path, header, match):
    f = str(tmp_path / "x.safetensors")
    _write_raw(f, header, b"\0" * 8)
    with pytest.raises(CheckpointError, match=match):
        SafetensorsFile(f)


def test_tensor_byte_count_must_match_shape(tmp_path):
    f = str(tmp_path / "x.safetensors")
    _write_raw(f, {"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"\0" * 8)
    with pytest.raises(CheckpointError, match=r"tensor 'a' holds 8 bytes, but F32 \[3\] needs 12"):
        SafetensorsFile(f).tensor("a")


def test_safetensors_reader_against_the_safetensors_library(tmp_path):
    rng = np.random.default_rng(0)
    tensors = {"f32": rng.standard_normal((3, 5)).astype(np.float32),
               "f16": rng.standard_normal((7,)).astype(np.float16),
               "scalar": np.array(2.5, np.float32), "empty": np.zeros((0, 4), np.float32)}
    f = str(tmp_path / "lib.safetensors")
    save_file(tensors, f, metadata={"k": "v"})
    st = SafetensorsFile(f)
    assert st.metadata == {"k": "v"} and set(st.entries) == set(tensors)
    for k, v in tensors.items():
        got = st.tensor(k)
        assert got.dtype == np.float32 and got.shape == v.shape
        np.testing.assert_array_equal(got, v.astype(np.float32))
    # bf16: the top halves of float32 values
    from safetensors.torch import save_file as save_torch
    bf = torch.tensor([1.0, -2.5, 3.140625, 1e-3, 65504.0, -1e30]).to(torch.bfloat16)
    save_torch({"bf": bf}, str(tmp_path / "bf.safetensors"))
    np.testing.assert_array_equal(SafetensorsFile(str(tmp_path / "bf.safetensors")).tensor("bf"),
                                  bf.float().numpy())


@pytest.mark.parametrize("np_dtype,name", [(np.float64, "F64"), (np.int32, "I32"), (np.int64, "I64"),
                                           (np.int8, "I8")])
def test_unsupported_tensor_dtype(saved, tmp_path, np_dtype, name):
    path = copy_ckpt(saved, tmp_path / "dtype")
    key = "transformer.h.1.attn.c_proj.weight"
    rewrite(path, lambda t: t.update({key: t[key].astype(np_dtype)}))
    assert st_dtypes(path)[key] == name
    with pytest.raises(CheckpointError, match=rf"tensor '{key}' has dtype {name}; supported: F32, F16, BF16"):
        gptcpp.GPT2.from_pretrained(path)


@pytest.mark.parametrize("victim", ["transformer.h.1.mlp.c_fc.bias", "transformer.ln_f.weight",
                                    "transformer.wpe.weight", "transformer.wte.weight"])
def test_missing_tensor(saved, tmp_path, victim):
    path = copy_ckpt(saved, tmp_path / "missing")
    rewrite(path, lambda t: t.pop(victim))
    canon = victim[len("transformer."):]
    with pytest.raises(CheckpointError, match=rf"tensor '{canon}' is missing from the checkpoint"):
        gptcpp.GPT2.from_pretrained(path)


def test_tensor_with_wrong_shape(saved, tmp_path):
    path = copy_ckpt(saved, tmp_path / "shape")
    key = "transformer.h.0.attn.c_attn.weight"
    rewrite(path, lambda t: t.update({key: np.ascontiguousarray(t[key].T)}))  # [96, 32] instead of [32, 96]
    with pytest.raises(CheckpointError, match=rf"tensor '{key}' has shape \[96, 32\], but config\.json implies "
                                              r"\[32, 96\]"):
        gptcpp.GPT2.from_pretrained(path)


@pytest.fixture(scope="module")
def sharded(base, tmp_path_factory):
    return save(base, tmp_path_factory.mktemp("sharded"), max_shard_size="50KB")


def test_sharded_index_names_a_missing_shard(sharded, tmp_path):
    path = copy_ckpt(sharded, tmp_path / "lost")
    shard = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))[-1]
    os.remove(os.path.join(path, shard))
    with pytest.raises(CheckpointError, match=rf"names the shard {shard}, which is missing"):
        gptcpp.GPT2.from_pretrained(path)


def test_sharded_index_places_a_tensor_in_the_wrong_shard(sharded, tmp_path):
    path = copy_ckpt(sharded, tmp_path / "wrong")
    index_path = os.path.join(path, "model.safetensors.index.json")
    with open(index_path) as f:
        index = json.load(f)
    shards = sorted(set(index["weight_map"].values()))
    name = next(k for k, v in index["weight_map"].items() if v == shards[0])
    index["weight_map"][name] = shards[1]
    with open(index_path, "w") as f:
        json.dump(index, f)
    with pytest.raises(CheckpointError, match=rf"places tensor '{name}' in {shards[1]}, which does not hold it"):
        gptcpp.GPT2.from_pretrained(path)


@pytest.mark.parametrize("content", [b"{", b"[]", b'{"metadata": {}}', b'{"weight_map": 3}',
                                     b'{"weight_map": {"wte.weight": 3}}', b'{"weight_map": {"\xff": "a"}}'])
def test_sharded_index_invalid(sharded, tmp_path, content):
    path = copy_ckpt(sharded, tmp_path / "badindex")
    with open(os.path.join(path, "model.safetensors.index.json"), "wb") as f:
        f.write(content)
    with pytest.raises(CheckpointError, match=r"model\.safetensors\.index\.json is not a valid safetensors index"):
        gptcpp.GPT2.from_pretrained(path)


def test_sharded_index_missing_a_tensor(sharded, tmp_path):
    path = copy_ckpt(sharded, tmp_path / "short")
    index_path = os.path.join(path, "model.safetensors.index.json")
    with open(index_path) as f:
        index = json.load(f)
    del index["weight_map"]["transformer.h.1.ln_2.bias"]
    with open(index_path, "w") as f:
        json.dump(index, f)
    with pytest.raises(CheckpointError, match=r"tensor 'h\.1\.ln_2\.bias' is missing"):
        gptcpp.GPT2.from_pretrained(path)


def test_a_file_instead_of_a_directory(saved):
    with pytest.raises(CheckpointError, match=r"is not a directory \(pass the folder that holds config\.json\)"):
        gptcpp.GPT2.from_pretrained(os.path.join(saved, "config.json"))


def test_unknown_hub_id_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read at import time
    with pytest.raises(OSError) as info:
        gptcpp.GPT2.from_pretrained("nobody-gptcpp-test/no-such-model")
    msg = str(info.value)
    assert "'nobody-gptcpp-test/no-such-model'" in msg and "not a local directory" in msg
    assert "Pass the path of a directory holding config.json" in msg


def test_missing_local_directory_says_so(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(OSError, match=r"not a local directory.*Pass the path of a directory"):
        gptcpp.GPT2.from_pretrained(str(tmp_path / "does" / "not" / "exist"))


# ---- inputs to logits() ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def loaded(saved):
    return gptcpp.GPT2.from_pretrained(saved)


@pytest.mark.parametrize("ids,match", [
    ([0, 211], r"token id 211 is outside the vocabulary \(0\.\.210\)"),
    ([5, -1], r"token id -1 is outside the vocabulary"),
    ([10 ** 12], r"outside the vocabulary"),
    (["a"], r"token ids must be integers"),
    ([None], r"token ids must be integers"),
    ([], r"token_ids is empty"),
])
def test_bad_token_ids(loaded, ids, match):
    with pytest.raises(ValueError, match=match):
        loaded.logits(ids)


def test_numpy_token_ids_accepted(loaded, base):
    ids = np.array(rng_ids(6, 211), dtype=np.int64)
    np.testing.assert_allclose(loaded.logits(ids), torch_logits(base, ids.tolist()), atol=TOL, rtol=0)


def test_context_length_limit(loaded):
    n = loaded.config.n_positions
    assert loaded.logits([3] * n).shape == (n, 211)
    with pytest.raises(ValueError, match=rf"{n + 1} tokens exceed the model's context of {n} \(n_positions\)"):
        loaded.logits([3] * (n + 1))


def test_non_integer_token_ids_are_refused(tmp_path):
    from conftest import random_gpt2, save
    model = gptcpp.GPT2.from_pretrained(save(random_gpt2(), tmp_path / "m"))
    for bad in ([1.7, 2.2], [1, True], ["3"], np.array([1.0, 2.0])):
        with pytest.raises(ValueError, match="integers"):
            model.logits(bad)
    assert model.logits(np.array([1, 2], dtype=np.int64)).shape == (2, model.config.vocab_size)
