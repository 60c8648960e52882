"""GPT-2 config.json reading and validation.

Every field that changes the computation is checked: a value gptcpp does not implement is refused with an
error naming the field and the value, never computed wrong."""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field

# Activations transformers' GPT-2 accepts that gptcpp computes (the tanh-approximated GELU under its several
# names, exact GELU, and the plain ones).
SUPPORTED_ACTIVATIONS = (
    "gelu_new", "gelu_pytorch_tanh", "gelu_fast", "gelu_accurate", "gelu", "quick_gelu",
    "relu", "silu", "swish", "tanh", "sigmoid", "linear",
)


_ALIASES = {"hidden_size": "n_embd", "max_position_embeddings": "n_positions", "num_attention_heads": "n_head",
            "num_hidden_layers": "n_layer"}


class ConfigError(ValueError):
    """config.json is missing, unreadable, or asks for something gptcpp does not compute."""


@dataclass
class GPT2Config:
    vocab_size: int = 50257
    n_positions: int = 1024
    n_embd: int = 768
    n_layer: int = 12
    n_head: int = 12
    n_inner: int | None = None
    layer_norm_epsilon: float = 1e-5
    activation_function: str = "gelu_new"
    scale_attn_weights: bool = True
    scale_attn_by_inverse_layer_idx: bool = False
    reorder_and_upcast_attn: bool = False
    tie_word_embeddings: bool = True
    bos_token_id: int | None = 50256
    eos_token_id: int | list[int] | None = 50256
    extra: dict = field(default_factory=dict, repr=False)

    @property
    def inner_dim(self) -> int:
        return self.n_inner if self.n_inner is not None else 4 * self.n_embd

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def eos_token_ids(self) -> list[int]:
        e = self.eos_token_id
        if e is None:
            return []
        return list(e) if isinstance(e, (list, tuple)) else [int(e)]

    def core_dict(self) -> dict:
        """The fields the C++ model reads."""
        return {
            "vocab_size": self.vocab_size, "n_positions": self.n_positions, "n_embd": self.n_embd,
            "n_layer": self.n_layer, "n_head": self.n_head, "n_inner": self.inner_dim,
            "layer_norm_epsilon": float(self.layer_norm_epsilon), "activation_function": self.activation_function,
            "scale_attn_weights": bool(self.scale_attn_weights),
            "scale_attn_by_inverse_layer_idx": bool(self.scale_attn_by_inverse_layer_idx),
        }

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("extra")
        return d

    @classmethod
    def from_dict(cls, raw: dict) -> "GPT2Config":
        raw = dict(raw)
        model_type = raw.get("model_type", "gpt2")
        if model_type != "gpt2":
            raise ConfigError(f"config.json: model_type {model_type!r} is not supported (only 'gpt2')")
        if raw.get("add_cross_attention"):
            raise ConfigError("config.json: add_cross_attention=True is not supported (decoder-only GPT-2 only)")
        # transformers' GPT2Config.attribute_map: the generic names set the GPT-2 fields, and win over them.
        # Ignoring them would be silent for n_head (it changes no tensor shape).
        for alias, name in _ALIASES.items():
            if alias in raw:
                raw[name] = raw[alias]
        kw = {}
        if "n_positions" in raw:
            kw["n_positions"] = raw["n_positions"]
        elif "n_ctx" in raw:
            kw["n_positions"] = raw["n_ctx"]
        for name in ("vocab_size", "n_embd", "n_layer", "n_head", "n_inner", "layer_norm_epsilon",
                     "activation_function", "scale_attn_weights", "scale_attn_by_inverse_layer_idx",
                     "reorder_and_upcast_attn", "tie_word_embeddings", "bos_token_id", "eos_token_id"):
            if name in raw:
                kw[name] = raw[name]
        known = set(kw) | set(_ALIASES) | {"n_ctx", "model_type", "add_cross_attention"}
        cfg = cls(**kw, extra={k: v for k, v in raw.items() if k not in known})
        cfg.validate()
        return cfg

    def validate(self) -> None:
        def positive_int(name):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ConfigError(f"config.json: {name} must be a positive integer, got {v!r}")

        for name in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head"):
            positive_int(name)
        if self.n_inner is not None:
            positive_int("n_inner")
        if self.n_embd % self.n_head:
            raise ConfigError(f"config.json: n_embd ({self.n_embd}) is not divisible by n_head ({self.n_head})")
        if self.activation_function not in SUPPORTED_ACTIVATIONS:
            raise ConfigError(
                f"config.json: activation_function {self.activation_function!r} is not supported "
                f"(supported: {', '.join(SUPPORTED_ACTIVATIONS)})")
        if not isinstance(self.layer_norm_epsilon, (int, float)) or isinstance(self.layer_norm_epsilon, bool) \
                or not self.layer_norm_epsilon > 0:
            raise ConfigError(f"config.json: layer_norm_epsilon must be a positive number, got {self.layer_norm_epsilon!r}")
        for name in ("scale_attn_weights", "scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn",
                     "tie_word_embeddings"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"config.json: {name} must be true or false, got {getattr(self, name)!r}")
        for e in self.eos_token_ids:
            if not isinstance(e, int) or not 0 <= e < self.vocab_size:
                raise ConfigError(f"config.json: eos_token_id {e!r} is outside the vocabulary (0..{self.vocab_size - 1})")


def load_config(directory: str) -> GPT2Config:
    path = os.path.join(directory, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no config.json in {directory}")
    try:
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path} does not hold a JSON object")
    return GPT2Config.from_dict(raw)
