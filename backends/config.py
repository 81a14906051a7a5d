"""Model configuration shared by every backend, built from an HF config dict or GGUF metadata."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from backends.errors import ModelError

# model_type -> whether q/k/v carry a bias and whether o_proj does
SUPPORTED = {
    "llama": (False, False),
    "mistral": (False, False),
    "qwen2": (True, False),
}


@dataclass
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    bos_token_id: int | None = None
    eos_token_id: list[int] = field(default_factory=list)
    raw: dict = field(default_factory=dict, repr=False)  # the checkpoint's dict, for mlx-lm

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "config.json") -> "ModelConfig":
        mt = d.get("model_type")
        if mt not in SUPPORTED:
            raise ModelError(
                f"{source}: unsupported architecture {mt!r} "
                f"(supported: {', '.join(sorted(SUPPORTED))})"
            )
        qkv_bias, o_bias = SUPPORTED[mt]
        if mt == "llama" and d.get("attention_bias"):
            qkv_bias = o_bias = True
        # transformers >= 5 writes rope_theta and the scaling under one "rope_parameters" dict
        rp = d.get("rope_parameters")
        rope: dict[str, Any] = rp if isinstance(rp, dict) else {}
        scaling = d.get("rope_scaling")
        if scaling is None and rope.get("rope_type", "default") != "default":
            scaling = {k: v for k, v in rope.items() if k != "rope_theta"}
        try:
            heads = int(d["num_attention_heads"])
            hidden = int(d["hidden_size"])
            eos = d.get("eos_token_id")
            eos = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
            return cls(
                model_type=mt,
                vocab_size=int(d["vocab_size"]),
                hidden_size=hidden,
                intermediate_size=int(d["intermediate_size"]),
                num_hidden_layers=int(d["num_hidden_layers"]),
                num_attention_heads=heads,
                num_key_value_heads=int(d.get("num_key_value_heads") or heads),
                head_dim=int(d.get("head_dim") or hidden // heads),
                rms_norm_eps=float(d.get("rms_norm_eps", 1e-5)),
                rope_theta=float(d.get("rope_theta") or rope.get("rope_theta") or 10000.0),
                rope_scaling=scaling,
                max_position_embeddings=int(d.get("max_position_embeddings") or 4096),
                tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
                qkv_bias=qkv_bias,
                o_bias=o_bias,
                mlp_bias=bool(d.get("mlp_bias", False)),
                bos_token_id=d.get("bos_token_id"),
                eos_token_id=eos,
                raw=dict(d),
            )
        except KeyError as e:
            raise ModelError(f"{source}: missing config key {e.args[0]!r}") from None

    def to_hf_dict(self) -> dict[str, Any]:
        """An HF-style config dict (what mlx-lm and transformers expect)."""
        d = dict(self.raw)
        d.update(
            {k.name: getattr(self, k.name) for k in dataclasses.fields(self)
             if k.name not in ("raw", "qkv_bias", "o_bias", "eos_token_id")}
        )
        d["eos_token_id"] = self.eos_token_id
        d["attention_bias"] = self.model_type == "llama" and self.qkv_bias
        d.setdefault("architectures", [{"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                                        "qwen2": "Qwen2ForCausalLM"}[self.model_type]])
        d.setdefault("hidden_act", "silu")
        if d.get("rope_scaling") is None:
            d.pop("rope_scaling", None)
        return d

    def layer_bytes(self, bytes_per_param: float) -> int:
        """Approximate weight bytes of one decoder layer."""
        h, i = self.hidden_size, self.intermediate_size
        q = self.num_attention_heads * self.head_dim
        kv = self.num_key_value_heads * self.head_dim
        params = h * (q + 2 * kv) + q * h + 3 * h * i + 2 * h
        return int(params * bytes_per_param)

    def kv_bytes_per_token(self, bytes_per_elem: int = 2) -> int:
        """KV cache bytes per token per layer."""
        return 2 * self.num_key_value_heads * self.head_dim * bytes_per_elem
