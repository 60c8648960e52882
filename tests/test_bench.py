"""`gptcpp bench --quick` runs end to end and reports every figure (no timing is asserted)."""
import importlib.util
import json
import os
import subprocess
import sys

import pytest

import gptcpp
from gptcpp.bench import format_compute_factor, same_format_ratios
from conftest import random_gpt2, save


def test_bench_quick(tmp_path):
    model = save(random_gpt2(seed=2, vocab_size=300, n_embd=32, n_layer=2, n_head=2), tmp_path / "m")
    out = tmp_path / "bench.json"
    package_root = os.path.dirname(os.path.dirname(os.path.abspath(gptcpp.__file__)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([package_root, os.environ.get("PYTHONPATH", "")])}
    r = subprocess.run([sys.executable, "-m", "gptcpp", "bench", "--model", model, "--quick", "--dtypes",
                        "fp32,int8,fp32-blocked", "--json", str(out)], capture_output=True, text=True, env=env,
                       timeout=600)
    assert r.returncode == 0, r.stderr
    data = json.loads(out.read_text())
    assert data["limits"]["read_bandwidth_gb_s"] > 0
    assert len(data["limits"]["bandwidth_readings_gb_s"]) == 3  # at the start, after the one round and the decode round
    assert all(v > 0 for k, v in data["limits"]["numpy_gemm_gflops"].items() if k != "blas")
    for name in ("gptcpp fp32", "gptcpp int8", "gptcpp fp32-blocked"):
        res = data["results"][name]
        for key in ("pp_tok_s", "tg_tok_s", "batch_tok_s", "decode_fraction_of_bandwidth", "prefill_fraction_of_gemm",
                    "load_s", "peak_rss_bytes", "python_overhead_fraction"):
            assert res[key] >= 0, key
        assert res["pp_tok_s"] > 0 and res["peak_rss_bytes"] > 0
        # prefill against the format's own compute peak: 4x float32 GEMM for int8 on a VNNI level, else 1x
        factor = format_compute_factor(name.split()[1].replace("-blocked", ""), data["machine"]["isa"])
        assert res["prefill_fraction_of_gemm"] == pytest.approx(factor * res["prefill_fraction_of_format_peak"])
    assert "contender" in r.stdout


def test_same_format_peers_follow_the_cpu():
    """OpenVINO's fp32 computes in bf16 on a CPU with AVX512-BF16 (gptcpp bf16's peer there) and in float32
    without it (then an fp32 peer, and the 16-bit formats meet its fp16 weights and llama.cpp's F16)."""
    fig = lambda pp, tg, b: {"pp_tok_s": pp, "tg_tok_s": tg, "batch_tok_s": b}
    results = {"gptcpp fp32": fig(100, 10, 50), "gptcpp bf16": fig(200, 20, 100), "gptcpp fp16": fig(150, 20, 80),
               "ctranslate2 fp32": fig(80, 8, 25), "openvino fp32": fig(125, 5, 100),
               "openvino fp16": fig(120, 16, 40), "llama.cpp f16": fig(100, 10, 0)}
    with_bf16 = same_format_ratios(results, cpu_bf16=True)
    assert with_bf16["gptcpp fp32"]["pp_tok_s"] == (1.25, "ctranslate2 fp32")
    assert with_bf16["gptcpp bf16"]["pp_tok_s"] == (1.6, "openvino fp32")
    assert with_bf16["gptcpp fp16"]["tg_tok_s"] == (2.0, "llama.cpp f16")
    without = same_format_ratios(results, cpu_bf16=False)
    assert without["gptcpp fp32"]["pp_tok_s"] == (0.8, "openvino fp32")
    assert without["gptcpp fp32"]["batch_tok_s"] == (0.5, "openvino fp32")
    assert without["gptcpp bf16"]["pp_tok_s"] == (pytest.approx(200 / 120), "openvino fp16")
    assert without["gptcpp bf16"]["tg_tok_s"] == (1.25, "openvino fp16")
    assert without["gptcpp fp16"]["batch_tok_s"] == (2.0, "openvino fp16")  # llama.cpp has no batch figure


def test_bench_peers_quick_runs_whatever_is_installed(tmp_path):
    """--peers runs each installed peer on the same weights and names each missing one in a line, without failing
    (here: transformers and CTranslate2 when installed; OpenVINO GenAI exported and run when installed)."""
    model = save(random_gpt2(seed=2, vocab_size=300, n_embd=32, n_layer=2, n_head=2), tmp_path / "m")
    out = tmp_path / "bench.json"
    package_root = os.path.dirname(os.path.dirname(os.path.abspath(gptcpp.__file__)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([package_root, os.environ.get("PYTHONPATH", "")])}
    r = subprocess.run([sys.executable, "-m", "gptcpp", "bench", "--model", model, "--quick", "--peers",
                        "--openvino", "fp32", "--json", str(out)], capture_output=True, text=True, env=env, timeout=900)
    assert r.returncode == 0, r.stderr
    data = json.loads(out.read_text())
    results = data["results"]
    assert results["transformers fp32"]["tg_tok_s"] > 0  # torch and transformers are test requirements
    # gptcpp fp32 against the best same-format peer: at least transformers fp32, with the ratio printed
    vs = data["same_format"]["gptcpp fp32"]["tg_tok_s"]
    assert vs["peer"] in ("transformers fp32", "ctranslate2 fp32", "openvino fp32 f32-compute")
    assert abs(vs["ratio"] - results["gptcpp fp32"]["tg_tok_s"] / results[vs["peer"]]["tg_tok_s"]) < 1e-9
    assert f"x {vs['peer']}" in r.stdout
    for module, label, name in (("ctranslate2", "CTranslate2", "ctranslate2 fp32"),
                                ("openvino_genai", "OpenVINOGenAI", "openvino fp32")):
        try:
            __import__(module)
        except ImportError:
            assert f"{label}: not installed, skipped" in r.stdout and name not in results
        else:  # it ran, or said why it could not (CTranslate2 wants the vocabulary files this model lacks)
            assert (name in results and results[name]["batch_tok_s"] > 0) or f"{label}: skipped (" in r.stdout, r.stdout


def test_bench_speculative_quick(tmp_path):
    model = save(random_gpt2(seed=2, vocab_size=300, n_positions=640, n_embd=32, n_layer=2, n_head=2), tmp_path / "m")
    out = tmp_path / "spec.json"
    package_root = os.path.dirname(os.path.dirname(os.path.abspath(gptcpp.__file__)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([package_root, os.environ.get("PYTHONPATH", "")]),
           "HOME": str(tmp_path)}  # the draft checkpoint is built under ~/.cache
    r = subprocess.run([sys.executable, "-m", "gptcpp", "bench", "--model", model, "--quick", "--speculative",
                        "--json", str(out)], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr
    data = json.loads(out.read_text())
    for key in ("verify_over_plain", "draft_token_over_target_step", "speedup_at_acceptance_0.6",
                "speedup_at_acceptance_0.8", "measured_speedup", "ttft_ratio"):
        assert data[key] > 0, key
    assert 0 <= data["measured_acceptance"] <= 1


# Stand-ins for openvino / openvino_genai, put first on the path of the benchmark's process: OpenVINO missing, or
# installed but failing when the pipeline is built, or when it generates. Each must print one line and go on.
_GENAI = ("class SchedulerConfig:\n    pass\n\n\nclass GenerationConfig:\n    pass\n\n\n"
          "TokenizedInputs = lambda ids, mask: ids\n\n\nclass LLMPipeline:\n    def __init__(self, *a, **k):\n")
_FAKE_OPENVINO = {
    "missing": (None, 'raise ImportError("hidden by the test")', "OpenVINOGenAI: not installed, skipped"),
    "fails-to-load": ("Tensor = None\n", _GENAI + "        raise RuntimeError('no device in the test')\n",
                      "OpenVINOGenAI fp32: skipped (RuntimeError: no device in the test)"),
    "fails-while-measured": ("Tensor = lambda a: a\n",
                             _GENAI + "        pass\n\n    def generate(self, *a):\n"
                                      "        raise RuntimeError('out of memory in the test')\n",
                             "openvino fp32: skipped (RuntimeError: out of memory in the test)"),
}


@pytest.mark.parametrize("case", list(_FAKE_OPENVINO))
def test_bench_peers_survive_openvino_missing_or_failing(tmp_path, case):
    openvino, genai, line = _FAKE_OPENVINO[case]
    fake = tmp_path / "fake"
    fake.mkdir()
    (fake / "openvino_genai.py").write_text(genai)
    if openvino:
        (fake / "openvino.py").write_text(openvino)
    model = save(random_gpt2(seed=2, vocab_size=300, n_embd=32, n_layer=2, n_head=2), tmp_path / "m")
    os.makedirs(model + "-ov-fp32")
    open(os.path.join(model + "-ov-fp32", "openvino_model.xml"), "w").close()  # an export made before: reused
    out = tmp_path / "bench.json"
    package_root = os.path.dirname(os.path.dirname(os.path.abspath(gptcpp.__file__)))
    env = {**os.environ,
           "PYTHONPATH": os.pathsep.join([str(fake), package_root, os.environ.get("PYTHONPATH", "")])}
    r = subprocess.run([sys.executable, "-m", "gptcpp", "bench", "--model", model, "--quick", "--peers",
                        "--openvino-formats", "fp32", "--json", str(out)], capture_output=True, text=True, env=env,
                       timeout=600)
    assert r.returncode == 0, r.stderr
    assert line in r.stdout, r.stdout
    results = json.loads(out.read_text())["results"]
    assert "openvino fp32" not in results and results["gptcpp fp32"]["tg_tok_s"] > 0


def test_bench_openvino_quick(tmp_path):
    """OpenVINO GenAI for real: each format exported once with optimum-cli next to the checkpoint, then timed."""
    pytest.importorskip("openvino_genai", reason="openvino-genai is not installed")
    if importlib.util.find_spec("optimum.intel") is None:
        pytest.skip("optimum-intel is not installed")
    from gptcpp.bench import OpenVINOGenAI
    model = save(random_gpt2(seed=2, vocab_size=300, n_embd=32, n_layer=2, n_head=2), tmp_path / "m")
    out = tmp_path / "bench.json"
    package_root = os.path.dirname(os.path.dirname(os.path.abspath(gptcpp.__file__)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([package_root, os.environ.get("PYTHONPATH", "")])}
    r = subprocess.run([sys.executable, "-m", "gptcpp", "bench", "--model", model, "--quick", "--peers",
                        "--openvino-formats", "fp32,fp32:f32,int8", "--json", str(out)], capture_output=True,
                       text=True, env=env, timeout=900)
    assert r.returncode == 0, r.stderr
    results = json.loads(out.read_text())["results"]
    for name in ("openvino fp32", "openvino fp32 f32-compute", "openvino int8"):
        assert name in results, r.stdout
        assert all(results[name][k] > 0 for k in ("pp_tok_s", "tg_tok_s", "batch_tok_s")), name
    xml = os.path.join(model + "-ov-fp32", "openvino_model.xml")
    made = os.path.getmtime(xml)
    ov = OpenVINOGenAI(model, 1, "fp32", "f32")  # the export is reused, not made again
    assert os.path.getmtime(xml) == made and ov.name == "openvino fp32 f32-compute"
    assert ov.prefill(list(range(20))) > 0 and ov.decode([[1, 2, 3]] * 3, 4) > 0  # 4 new tokens each, checked


def test_format_compute_factor():
    assert format_compute_factor("fp32", "avx512-bf16") == 1 and format_compute_factor("fp16", "avx512-bf16") == 1
    assert format_compute_factor("bf16", "avx512-bf16") == 2 and format_compute_factor("bf16", "avx512-vnni") == 1
    assert format_compute_factor("bf16", "avx512-amx") == 2 and format_compute_factor("int8", "avx512-amx") == 4
    assert format_compute_factor("int8", "avx2-vnni") == 4 and format_compute_factor("int4", "avx512") == 1
