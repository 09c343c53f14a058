"""Model configuration read from a Hugging Face ``config.json``.

One dataclass for every supported family; ``read_config`` maps each family's field names
(and their spelling variants across transformers versions) onto it and checks them.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import torch

SUPPORTED = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe")

DTYPES = {
    "float32": torch.float32, "float": torch.float32, "fp32": torch.float32,
    "float16": torch.float16, "half": torch.float16, "fp16": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
}


def dtype_from_name(name) -> torch.dtype | None:
    """'bfloat16', 'torch.bfloat16', 'bf16', ... -> the torch dtype; None when not supported."""
    return DTYPES.get(str(name).replace("torch.", ""))


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


class ConfigError(ValueError):
    """config.json is missing, unreadable, or describes something we cannot run."""


@dataclass
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    num_experts: int
    top_k: int
    moe_intermediate_size: int
    norm_topk_prob: bool
    moe_layers: list[int]                 # decoder layers whose MLP is a MoE block
    dense_intermediate_size: int          # MLP of the other layers
    shared_expert_intermediate_size: int  # 0 = no shared expert
    qkv_bias: bool
    o_bias: bool
    qk_norm: str | None                   # None, "head" (per head) or "full" (whole projection)
    clip_qkv: float | None
    sliding_windows: list[int | None]     # per decoder layer
    hidden_act: str
    dtype: torch.dtype
    router_weights_in_dtype: bool         # routing weights rounded to the model dtype (Qwen, OLMoE)
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)
    pad_token_id: int | None = None

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads",
                     "head_dim", "num_experts", "top_k", "moe_intermediate_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(f"config.json: {name} must be a positive integer, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"config.json: num_attention_heads ({self.num_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_kv_heads})")
        if self.top_k > self.num_experts:
            raise ConfigError(
                f"config.json: num_experts_per_tok ({self.top_k}) is larger than the number of "
                f"experts ({self.num_experts})")
        if not self.moe_layers:
            raise ConfigError("config.json describes no MoE layer (mlp_only_layers / decoder_sparse_step)")
        if self.hidden_act != "silu":
            raise ConfigError(f"config.json: hidden_act '{self.hidden_act}' is not supported (only silu)")

    @property
    def num_moe_layers(self) -> int:
        return len(self.moe_layers)

    @property
    def num_routed_experts(self) -> int:
        """Routed experts of the whole model (every MoE block's)."""
        return self.num_experts * self.num_moe_layers

    def expert_bytes(self) -> int:
        return 3 * self.hidden_size * self.moe_intermediate_size * self.dtype.itemsize

    def all_expert_bytes(self) -> int:
        return self.expert_bytes() * self.num_routed_experts


def _get(raw: dict, *names, default=None, required=True):
    for n in names:
        if n in raw and raw[n] is not None:
            return raw[n]
    if required and default is None:
        raise ConfigError(f"config.json has no '{names[0]}'" + (f" (nor {', '.join(names[1:])})" if len(names) > 1 else ""))
    return default


def _rope_theta(raw: dict) -> float:
    params = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
    kind = params.get("rope_type", params.get("type", "default")) if isinstance(params, dict) else "default"
    if kind not in ("default", None):
        raise ConfigError(f"config.json: rope type '{kind}' is not supported (only the default RoPE)")
    theta = (params.get("rope_theta") if isinstance(params, dict) else None) or raw.get("rope_theta")
    if theta is None:
        raise ConfigError("config.json has neither rope_parameters.rope_theta nor rope_theta")
    return float(theta)


def _dtype(raw: dict) -> torch.dtype:
    name = raw.get("dtype") or raw.get("torch_dtype") or "float32"
    dtype = dtype_from_name(name)
    if dtype is None:
        raise ConfigError(f"config.json: dtype '{name}' is not supported (float32, float16, bfloat16)")
    return dtype


def _eos(value) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)]


def _moe_layers(raw: dict, n: int) -> list[int]:
    only_dense = set(raw.get("mlp_only_layers") or [])
    step = int(raw.get("decoder_sparse_step") or 1)
    return [i for i in range(n) if i not in only_dense and (i + 1) % step == 0]


def config_from_dict(raw: dict) -> ModelConfig:
    model_type = raw.get("model_type")
    if model_type not in SUPPORTED:
        raise ConfigError(
            f"config.json: model_type '{model_type}' is not supported; supported: {', '.join(SUPPORTED)}")
    hidden = int(_get(raw, "hidden_size"))
    heads = int(_get(raw, "num_attention_heads"))
    layers = int(_get(raw, "num_hidden_layers"))
    experts = int(_get(raw, "num_local_experts", "num_experts"))
    common = dict(
        model_type=model_type,
        vocab_size=int(_get(raw, "vocab_size")),
        hidden_size=hidden,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=int(_get(raw, "num_key_value_heads", default=heads)),
        head_dim=int(raw.get("head_dim") or hidden // heads),
        rms_norm_eps=float(_get(raw, "rms_norm_eps", default=1e-6)),
        rope_theta=_rope_theta(raw),
        max_position_embeddings=int(_get(raw, "max_position_embeddings", default=4096)),
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        num_experts=experts,
        top_k=int(_get(raw, "num_experts_per_tok")),
        hidden_act=raw.get("hidden_act", "silu"),
        dtype=_dtype(raw),
        bos_token_id=raw.get("bos_token_id"),
        eos_token_ids=_eos(raw.get("eos_token_id")),
        pad_token_id=raw.get("pad_token_id"),
        clip_qkv=None,
    )
    inter = int(_get(raw, "intermediate_size"))
    if model_type == "mixtral":
        window = raw.get("sliding_window")
        return ModelConfig(
            **common, moe_intermediate_size=inter, norm_topk_prob=True,
            moe_layers=list(range(layers)), dense_intermediate_size=inter,
            shared_expert_intermediate_size=0, qkv_bias=False, o_bias=False, qk_norm=None,
            sliding_windows=[window] * layers, router_weights_in_dtype=False)
    moe_inter = int(_get(raw, "moe_intermediate_size", default=inter)) if model_type != "olmoe" else inter
    if model_type == "olmoe":
        common["clip_qkv"] = raw.get("clip_qkv")
        bias = bool(raw.get("attention_bias", False))
        return ModelConfig(
            **common, moe_intermediate_size=moe_inter, norm_topk_prob=bool(raw.get("norm_topk_prob", False)),
            moe_layers=list(range(layers)), dense_intermediate_size=inter,
            shared_expert_intermediate_size=0, qkv_bias=bias, o_bias=bias, qk_norm="full",
            sliding_windows=[None] * layers, router_weights_in_dtype=True)
    use_window = bool(raw.get("use_sliding_window", False))
    window = raw.get("sliding_window") if use_window else None
    if model_type == "qwen2_moe":
        types = raw.get("layer_types") or [
            "sliding_attention" if use_window and (i + 1) % 2 and i < raw.get("max_window_layers", layers)
            else "full_attention" for i in range(layers)]
        windows = [window if t == "sliding_attention" else None for t in types]
        return ModelConfig(
            **common, moe_intermediate_size=moe_inter, norm_topk_prob=bool(raw.get("norm_topk_prob", False)),
            moe_layers=_moe_layers(raw, layers), dense_intermediate_size=inter,
            shared_expert_intermediate_size=int(raw.get("shared_expert_intermediate_size") or 0),
            qkv_bias=bool(raw.get("qkv_bias", True)), o_bias=False, qk_norm=None,
            sliding_windows=windows, router_weights_in_dtype=True)
    bias = bool(raw.get("attention_bias", False))
    return ModelConfig(  # qwen3_moe
        **common, moe_intermediate_size=moe_inter, norm_topk_prob=bool(raw.get("norm_topk_prob", False)),
        moe_layers=_moe_layers(raw, layers), dense_intermediate_size=inter,
        shared_expert_intermediate_size=0, qkv_bias=bias, o_bias=bias, qk_norm="head",
        sliding_windows=[window] * layers, router_weights_in_dtype=True)


def read_config(folder: str) -> ModelConfig:
    path = os.path.join(folder, "config.json")
    if not os.path.isfile(path):
        raise ConfigError(f"{path} does not exist: a model folder needs config.json (Hugging Face layout)")
    try:
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path} is not valid JSON: {e}") from e
    gen = os.path.join(folder, "generation_config.json")
    cfg = config_from_dict(raw)
    if os.path.isfile(gen):
        try:
            with open(gen, encoding="utf-8") as f:
                extra = _eos(json.load(f).get("eos_token_id"))
        except (OSError, json.JSONDecodeError) as e:
            raise ConfigError(f"{gen} is not valid JSON: {e}") from e
        cfg.eos_token_ids = list(dict.fromkeys(cfg.eos_token_ids + extra))
    return cfg
