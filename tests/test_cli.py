"""The gptcpp command, run as a subprocess on a local test model."""
import json
import os
import subprocess
import sys

import pytest

import gptcpp
from conftest import copy_gpt2_vocab, random_gpt2, save


def run(*args, stdin=None):
    package_root = os.path.dirname(os.path.dirname(os.path.abspath(gptcpp.__file__)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([package_root, os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-m", "gptcpp", *args], capture_output=True, text=True, env=env,
                          input=stdin, timeout=120)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    save(random_gpt2(seed=3, vocab_size=50257, n_embd=32, n_layer=2, n_head=2, bos_token_id=50256,
                     eos_token_id=50256), d)
    copy_gpt2_vocab(d)
    return str(d)


def test_generate_streams_the_library_text(model_dir):
    want = gptcpp.GPT2.from_pretrained(model_dir).generate("Hello world", max_new_tokens=12).text
    r = run("generate", "--model", model_dir, "--max-new-tokens", "12", "Hello world")
    assert r.returncode == 0, r.stderr
    assert r.stdout == "Hello world" + want + "\n"


def test_generate_json_and_options(model_dir):
    r = run("generate", "--model", model_dir, "--max-new-tokens", "5", "--do-sample", "--seed", "3",
            "--top-p", "0.9", "--logprobs", "2", "--json", "Hi")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    want = gptcpp.GPT2.from_pretrained(model_dir).generate("Hi", max_new_tokens=5, do_sample=True, seed=3, top_p=0.9)
    assert out["token_ids"] == want.token_ids and out["finish_reason"] == "length"
    assert len(out["logprobs"]) == 5 and len(out["logprobs"][0]["top_logprobs"]) == 2
    want = gptcpp.GPT2.from_pretrained(model_dir).generate("Hi", max_new_tokens=4, logit_bias={100: 50.0},
                                                           bad_words_ids=[[5, 6]])
    r = run("generate", "--model", model_dir, "--max-new-tokens", "4", "--logit-bias", "100=50",
            "--bad-words-ids", "5,6", "--json", "Hi")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["token_ids"] == want.token_ids == [100] * 4
    r = run("generate", "--model", model_dir, "--logit-bias", "oops", "Hi")
    assert r.returncode != 0 and "--logit-bias takes" in r.stderr
    r = run("generate", "--model", model_dir, "--max-new-tokens", "4", "--num-beams", "3",
            "--num-return-sequences", "2", "--json", "-", stdin="From stdin")
    assert r.returncode == 0, r.stderr
    assert len(json.loads(r.stdout)) == 2


def test_score_and_info(model_dir, tmp_path):
    text = "def f(x):\n    return x * 2\n" * 20
    f = tmp_path / "a.py"
    f.write_text(text)
    r = run("score", "--model", model_dir, str(f))
    assert r.returncode == 0, r.stderr
    ppl = float(r.stdout.split("perplexity")[-1])
    assert abs(ppl - gptcpp.GPT2.from_pretrained(model_dir).score(text).perplexity) < 1e-3 * ppl
    r = run("info", "--model", model_dir)
    assert r.returncode == 0, r.stderr
    assert "instruction sets:" in r.stdout and "n_embd: 32" in r.stdout and "bundled models:" in r.stdout
    assert "kernel choices for this cpu: avx512_fp32_chunk_rows=" in r.stdout


def test_quantize_command(model_dir, tmp_path):
    r = run("quantize", model_dir, str(tmp_path / "q"), "--dtype", "int8")
    assert r.returncode == 0, r.stderr
    r = run("info", "--model", str(tmp_path / "q"))
    assert "dtype: int8, KV cache: fp16" in r.stdout, r.stdout + r.stderr
    r = run("info", "--model", str(tmp_path / "q"), "--kv-cache-dtype", "fp32")
    assert "dtype: int8, KV cache: fp32" in r.stdout, r.stdout + r.stderr


@pytest.mark.parametrize("args,message", [
    (["generate", "--model", "/nonexistent/dir/x", "hi"], "could not load"),
    (["generate", "--max-new-tokens", "0", "hi"], "max_new_tokens"),
    (["score", "/no/such/file.txt"], "cannot read"),
    (["generate", "--temperature", "-1", "hi"], "temperature"),
])
def test_errors_are_one_line_without_traceback(model_dir, args, message):
    if "--model" not in args:
        args = [args[0], "--model", model_dir, *args[1:]]
    r = run(*args)
    assert r.returncode != 0
    assert "Traceback" not in r.stderr
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("gptcpp: error:") and message in lines[0], r.stderr
