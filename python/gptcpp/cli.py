"""The `gptcpp` command: generate, score, info, quantize, bench (and serve, with the server extra)."""
from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict

from .quantize import DTYPES, KV_CACHE_DTYPES

DEFAULT_MODEL = "gpt2"


class UsageError(Exception):
    pass


def _bool_or_never(v: str):
    low = v.lower()
    if low in ("true", "1", "yes"):
        return True
    if low in ("false", "0", "no"):
        return False
    if low == "never":
        return "never"
    raise argparse.ArgumentTypeError(f"expected true, false or never, got {v!r}")


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help="a local checkpoint directory, a bundled model name, or a Hugging Face hub id "
                        f"(default: {DEFAULT_MODEL})")
    p.add_argument("--dtype", choices=list(DTYPES), default=None,
                   help="weight format (default: fp32, or what a quantized checkpoint stores)")
    p.add_argument("--kv-cache-dtype", choices=list(KV_CACHE_DTYPES), default=None,
                   help="KV cache storage (default: fp32 for fp32 weights, fp16 for the other formats)")
    p.add_argument("--threads", type=int, default=None, help="threads (default: all cores)")


def _load(args, **kw):
    from .model import GPT2
    return GPT2.from_pretrained(args.model, threads=args.threads, dtype=args.dtype,
                                kv_cache_dtype=args.kv_cache_dtype, **kw)


# ---- generate --------------------------------------------------------------------------------------------
GEN_FLAGS = [  # (flag, option name, type)
    ("--max-new-tokens", "max_new_tokens", int), ("--min-new-tokens", "min_new_tokens", int),
    ("--temperature", "temperature", float), ("--top-k", "top_k", int), ("--top-p", "top_p", float),
    ("--min-p", "min_p", float), ("--typical-p", "typical_p", float),
    ("--repetition-penalty", "repetition_penalty", float), ("--presence-penalty", "presence_penalty", float),
    ("--frequency-penalty", "frequency_penalty", float), ("--no-repeat-ngram-size", "no_repeat_ngram_size", int),
    ("--num-beams", "num_beams", int), ("--length-penalty", "length_penalty", float),
    ("--num-return-sequences", "num_return_sequences", int), ("--seed", "seed", int),
    ("--logprobs", "logprobs", int), ("--num-assistant-tokens", "num_assistant_tokens", int),
    ("--prompt-lookup-num-tokens", "prompt_lookup_num_tokens", int),
]


def _add_generate(sub):
    p = sub.add_parser("generate", help="generate text from a prompt, streamed as it is produced")
    _model_args(p)
    p.add_argument("prompt", help="the prompt text, or - to read it from standard input")
    for flag, name, typ in GEN_FLAGS:
        p.add_argument(flag, dest=name, type=typ, default=None)
    p.add_argument("--do-sample", dest="do_sample", action="store_true", default=None, help="sample instead of greedy")
    p.add_argument("--early-stopping", dest="early_stopping", type=_bool_or_never, default=None)
    p.add_argument("--eos-token-id", dest="eos_token_id", type=int, action="append", default=None)
    p.add_argument("--stop", dest="stop", action="append", default=None, help="stop string (repeatable)")
    p.add_argument("--logit-bias", dest="logit_bias", action="append", default=None, metavar="TOKEN=BIAS",
                   help="add BIAS to the logit of token id TOKEN (repeatable)")
    p.add_argument("--bad-words-ids", dest="bad_words_ids", action="append", default=None, metavar="ID,ID,...",
                   help="a token sequence that must not be generated (repeatable)")
    p.add_argument("--num-assistant-tokens-schedule", dest="num_assistant_tokens_schedule",
                   choices=["heuristic", "constant"], default=None)
    p.add_argument("--max-matching-ngram-size", dest="max_matching_ngram_size", type=int, default=None)
    p.add_argument("--assistant-model", default=None, help="a draft model for speculative decoding")
    p.add_argument("--json", action="store_true", help="print the full result(s) as JSON instead of streaming")
    p.set_defaults(func=cmd_generate)


def cmd_generate(args) -> int:
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    options = {name: getattr(args, name) for _, name, _ in GEN_FLAGS if getattr(args, name) is not None}
    for name in ("do_sample", "early_stopping", "eos_token_id", "stop", "num_assistant_tokens_schedule",
                 "max_matching_ngram_size"):
        if getattr(args, name) is not None:
            options[name] = getattr(args, name)
    try:
        if args.logit_bias:
            options["logit_bias"] = {int(t): float(b) for t, b in (item.split("=", 1) for item in args.logit_bias)}
        if args.bad_words_ids:
            options["bad_words_ids"] = [[int(t) for t in item.split(",")] for item in args.bad_words_ids]
    except ValueError:
        raise UsageError("--logit-bias takes TOKEN=BIAS and --bad-words-ids a comma-separated list of token ids") from None
    model = _load(args)
    if args.assistant_model:
        from .model import GPT2
        options["assistant_model"] = GPT2.from_pretrained(args.assistant_model, threads=args.threads)
    streamable = options.get("num_beams", 1) == 1 and options.get("num_return_sequences", 1) == 1
    if args.json or not streamable:
        res = model.generate(prompt, **options)
        results = res if isinstance(res, list) else [res]
        if args.json:
            out = [asdict(r) for r in results]
            print(json.dumps(out[0] if len(out) == 1 else out, indent=2, ensure_ascii=False))
        else:
            for i, r in enumerate(results):
                print(("" if len(results) == 1 else f"--- {i}\n") + prompt + r.text)
        return 0
    sys.stdout.write(prompt)
    sys.stdout.flush()
    for piece in model.stream(prompt, **options):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0


# ---- score -----------------------------------------------------------------------------------------------
def _add_score(sub):
    p = sub.add_parser("score", help="perplexity of text files (sliding window over long ones)")
    _model_args(p)
    p.add_argument("files", nargs="+", help="text files (- for standard input)")
    p.add_argument("--stride", type=int, default=None, help="sliding-window stride in tokens (default: half the context)")
    p.set_defaults(func=cmd_score)


class _Progress:
    """A one-line progress bar on stderr (only when stderr is a terminal or GPTCPP_PROGRESS=1)."""

    def __init__(self, total: int, label: str):
        self.total, self.label = max(1, total), label
        self.on = sys.stderr.isatty() or os.environ.get("GPTCPP_PROGRESS") == "1"

    def update(self, done: int):
        if self.on:
            width = 30
            fill = int(width * min(done, self.total) / self.total)
            sys.stderr.write(f"\r{self.label} [{'#' * fill}{'.' * (width - fill)}] {done}/{self.total} tokens")
            sys.stderr.flush()

    def close(self):
        if self.on:
            sys.stderr.write("\n")


def cmd_score(args) -> int:
    model = _load(args)
    tok = model._require_tokenizer()
    total_lp, total_n = 0.0, 0
    for path in args.files:
        if path == "-":
            text = sys.stdin.read()
        else:
            try:
                with open(path, encoding="utf-8") as f:
                    text = f.read()
            except (OSError, UnicodeDecodeError) as e:
                raise UsageError(f"cannot read {path}: {e}") from None
        ids = tok.encode(text)
        if len(ids) < 2:
            raise UsageError(f"{path}: too short to score (needs at least 2 tokens)")
        bar = _Progress(len(ids), os.path.basename(path))
        res = model.score(ids, stride=args.stride, progress=bar.update)
        bar.close()
        nll = -res.total_logprob / res.n_scored
        print(f"{path}: {len(ids)} tokens, mean NLL {nll:.4f} nats, perplexity {res.perplexity:.3f}")
        total_lp += res.total_logprob
        total_n += res.n_scored
    if len(args.files) > 1:
        import math
        print(f"all: {total_n} scored tokens, perplexity {math.exp(-total_lp / total_n):.3f}")
    return 0


# ---- info ------------------------------------------------------------------------------------------------
def _add_info(sub):
    p = sub.add_parser("info", help="model config, weight format, instruction set, threads, bundled models")
    p.add_argument("--model", default=None, help="a model to describe (default: only the machine and the package)")
    p.add_argument("--dtype", choices=list(DTYPES), default=None)
    p.add_argument("--kv-cache-dtype", choices=list(KV_CACHE_DTYPES), default=None)
    p.add_argument("--threads", type=int, default=None)
    p.set_defaults(func=cmd_info)


def cmd_info(args) -> int:
    from . import __version__, bundled_models, cpu_info
    info = cpu_info()
    print(f"gptcpp {__version__}")
    print(f"cpu: {info['brand'] or 'unknown'}")
    print(f"instruction sets: supported {', '.join(info['supported_isas'])}; in use {info['isa']}")
    print(f"cpu features: {', '.join(k for k, v in info['features'].items() if v) or 'none'}")
    print(f"kernel choices for this cpu: {', '.join(f'{k}={v}' for k, v in info['tuning'].items())}")
    print(f"bundled models: {', '.join(bundled_models()) or 'none'}")
    if args.model:
        model = _load(args)
        print(f"model: {args.model}")
        print(f"  dtype: {model.dtype}, KV cache: {model.kv_cache_dtype}, parameters: {model.num_parameters():,}, "
              f"weight bytes: {model.weight_bytes():,}")
        print(f"  threads: {model.threads}, isa: {model.isa}")
        for k, v in model.config.to_dict().items():
            print(f"  {k}: {v}")
    return 0


# ---- quantize --------------------------------------------------------------------------------------------
def _add_quantize(sub):
    p = sub.add_parser("quantize", help="write a checkpoint in a smaller weight format (or fp32 in the kernels' layout) "
                                        "that loads without conversion")
    p.add_argument("src", help="checkpoint directory, bundled name or hub id")
    p.add_argument("dst", help="output directory")
    p.add_argument("--dtype", required=True, choices=list(DTYPES))
    p.set_defaults(func=cmd_quantize)


def cmd_quantize(args) -> int:
    from .quantize import save_quantized
    dst = save_quantized(args.src, args.dst, args.dtype)
    size = sum(os.path.getsize(os.path.join(dst, f)) for f in os.listdir(dst))
    print(f"wrote {args.dtype} checkpoint to {dst} ({size / 1e6:.1f} MB)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gptcpp", description="GPT-2 on the CPU")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_generate(sub)
    _add_score(sub)
    _add_info(sub)
    _add_quantize(sub)
    try:
        from . import bench
        bench.add_parser(sub)
    except ImportError:
        pass
    try:
        from . import server
        server.add_parser(sub)
    except ImportError:
        pass
    return parser


def main(argv=None) -> int:
    from .config import ConfigError
    from .loading import CheckpointError
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args) or 0
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0
    except (UsageError, ValueError, OSError, ConfigError, CheckpointError, RuntimeError, ImportError) as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"gptcpp: error: {msg}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
