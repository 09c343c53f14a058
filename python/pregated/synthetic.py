"""Synthetic models: the shapes of real MoE models with random weights, for benchmarks.

Experts are generated straight into the runtime's expert store (a few random experts per layer,
copied into every expert's block: no disk, no second copy of the model), dense weights straight
onto the device. `save()` writes one as a Hugging Face checkpoint for tools that need files.

Random weights route differently from trained ones: the routing is flatter and the
pre-gate's accuracy is not that of a real model. Speeds and bytes are real.
"""

from __future__ import annotations

import json
import os

import torch

from .config import config_from_dict, dtype_name

_COMMON = {"hidden_act": "silu", "rms_norm_eps": 1e-6, "tie_word_embeddings": False, "max_position_embeddings": 32768,
           "bos_token_id": 1, "eos_token_id": 2}

SHAPES = {
    "mixtral-8x7b": {"model_type": "mixtral", "vocab_size": 32000, "hidden_size": 4096, "num_hidden_layers": 32,
                     "num_attention_heads": 32, "num_key_value_heads": 8, "intermediate_size": 14336,
                     "num_local_experts": 8, "num_experts_per_tok": 2, "rope_theta": 1e6},
    "qwen3-30b-a3b": {"model_type": "qwen3_moe", "vocab_size": 151936, "hidden_size": 2048, "num_hidden_layers": 48,
                      "num_attention_heads": 32, "num_key_value_heads": 4, "head_dim": 128,
                      "intermediate_size": 6144, "moe_intermediate_size": 768, "num_experts": 128,
                      "num_experts_per_tok": 8, "norm_topk_prob": True, "rope_theta": 1e6},
    "olmoe-1b-7b": {"model_type": "olmoe", "vocab_size": 50304, "hidden_size": 2048, "num_hidden_layers": 16,
                    "num_attention_heads": 16, "num_key_value_heads": 16, "intermediate_size": 1024,
                    "num_experts": 64, "num_experts_per_tok": 8, "norm_topk_prob": False, "rope_theta": 10000.0},
    "qwen1.5-moe-a2.7b": {"model_type": "qwen2_moe", "vocab_size": 151936, "hidden_size": 2048,
                          "num_hidden_layers": 24, "num_attention_heads": 16, "num_key_value_heads": 16,
                          "intermediate_size": 5632, "moe_intermediate_size": 1408,
                          "shared_expert_intermediate_size": 5632, "num_experts": 60, "num_experts_per_tok": 4,
                          "norm_topk_prob": False, "qkv_bias": True, "rope_theta": 1e6},
    "tiny": {"model_type": "mixtral", "vocab_size": 512, "hidden_size": 64, "num_hidden_layers": 4,
             "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 96, "num_local_experts": 8,
             "num_experts_per_tok": 2, "rope_theta": 10000.0, "max_position_embeddings": 2048},
}


class NullTokenizer:
    """Synthetic models have no vocabulary worth reading: token ids in, empty text out."""
    eos_token = None
    chat_template = None

    def token_id(self, text):
        return None

    def encode(self, text, add_special_tokens=True):
        raise ValueError("a synthetic model has no tokenizer: give the prompt as token ids")

    def decode(self, ids, skip_special_tokens=True) -> str:
        return ""

    def apply_chat_template(self, messages, add_generation_prompt=True):
        raise ValueError("a synthetic model has no chat template: give the prompt as token ids")


class SyntheticModel:
    """A model source for Engine: `Engine(SyntheticModel("olmoe-1b-7b", layers=8))`."""

    def __init__(self, name: str, layers: int | None = None, dtype: str = "bfloat16", seed: int = 0,
                 pool: int = 4):
        if name not in SHAPES:
            raise ValueError(f"unknown synthetic model '{name}': choose one of {', '.join(SHAPES)}")
        raw = {**_COMMON, **SHAPES[name], "dtype": dtype}
        if layers is not None:
            if not 1 <= layers <= raw["num_hidden_layers"]:
                raise ValueError(f"--layers must be in 1..{raw['num_hidden_layers']} for {name}, got {layers}")
            raw["num_hidden_layers"] = layers
        self.name = name
        self.raw = raw
        self.config = config_from_dict(raw)
        self.tokenizer = NullTokenizer()
        self.seed = seed
        self.pool = pool

    def __repr__(self):
        return f"SyntheticModel({self.name!r}, layers={self.config.num_layers})"

    # --- weights --------------------------------------------------------------------------

    def dense_tensors(self, model, device, dtype):
        """name -> random tensor for every dense parameter of `model` (a meta-device CausalLM)."""
        g = torch.Generator(device=device).manual_seed(self.seed)
        out = {}
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name:
                out[name] = torch.ones(p.shape, device=device, dtype=dtype)
            elif name.endswith(".bias"):
                out[name] = torch.zeros(p.shape, device=device, dtype=dtype)
            else:
                std = 1.0 if "embed_tokens" in name else p.shape[-1] ** -0.5
                out[name] = (torch.randn(p.shape, generator=g, device=device) * std).to(dtype)
        return out

    def expert_pool(self, dtype):
        """A few random experts ({gate, up, down}) that fill every expert's block."""
        cfg = self.config
        H, I = cfg.hidden_size, cfg.moe_intermediate_size
        g = torch.Generator().manual_seed(self.seed + 1)
        return [{"gate": (torch.randn(I, H, generator=g) * H ** -0.5).to(dtype),
                 "up": (torch.randn(I, H, generator=g) * H ** -0.5).to(dtype),
                 "down": (torch.randn(H, I, generator=g) * I ** -0.5).to(dtype)} for _ in range(self.pool)]

    def load(self, model, runtime, device, dtype, progress=None) -> None:
        model.load_state_dict(self.dense_tensors(model, device, dtype), assign=True, strict=True)
        pool = self.expert_pool(dtype)
        cfg = self.config
        for m in range(cfg.num_moe_layers):
            for e in range(cfg.num_experts):
                for part, w in pool[(m * 7 + e) % len(pool)].items():
                    runtime.set_expert(m, e, part, w)
                if progress is not None:
                    progress.update(3 * cfg.hidden_size * cfg.moe_intermediate_size)

    def parameters(self) -> int:
        from .models import CausalLM

        with torch.device("meta"):
            model = CausalLM(self.config)
        dense = sum(p.numel() for p in model.parameters())
        cfg = self.config
        return dense + cfg.num_routed_experts * 3 * cfg.hidden_size * cfg.moe_intermediate_size

    # --- as files -------------------------------------------------------------------------

    def save(self, folder: str, dtype=torch.bfloat16, progress: bool = False) -> str:
        """Writes the model as a Hugging Face checkpoint (sharded, per-expert tensor names)."""
        from tqdm.auto import tqdm

        from .checkpoint import ShardWriter

        from .demo import _train_tokenizer
        from .models import CausalLM

        os.makedirs(folder, exist_ok=True)
        cfg = self.config
        with torch.device("meta"):
            model = CausalLM(cfg)
        dense = self.dense_tensors(model, "cpu", dtype)
        block = "block_sparse_moe" if cfg.model_type == "mixtral" else "mlp"
        names = ("w1", "w3", "w2") if cfg.model_type == "mixtral" else ("gate_proj", "up_proj", "down_proj")
        pool = self.expert_pool(dtype)
        writer = ShardWriter(folder)

        def moe_name(n):  # router / shared expert under the checkpoint's MoE prefix
            parts = n.split(".")
            return ".".join(parts[:3] + [block] + parts[4:]) if parts[3] == "mlp" and int(parts[2]) in cfg.moe_layers else n

        writer.add({n: t for n, t in dense.items() if not n.startswith("model.layers.")})
        for i in tqdm(range(cfg.num_layers), desc="saving", disable=not progress):
            tensors = {moe_name(n): t for n, t in dense.items() if n.startswith(f"model.layers.{i}.")}
            if i in cfg.moe_layers:
                m = cfg.moe_layers.index(i)
                for e in range(cfg.num_experts):
                    parts = pool[(m * 7 + e) % len(pool)]
                    for ours, theirs in zip(("gate", "up", "down"), names):
                        tensors[f"model.layers.{i}.{block}.experts.{e}.{theirs}.weight"] = parts[ours].clone()
            writer.add(tensors)
        writer.finish()
        raw = dict(self.raw)
        raw["dtype"] = dtype_name(dtype)
        raw["architectures"] = [{"mixtral": "MixtralForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM",
                                 "olmoe": "OlmoeForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM"}[cfg.model_type]]
        with open(os.path.join(folder, "config.json"), "w", encoding="utf-8") as f:
            json.dump(raw, f, indent=1)
        _train_tokenizer(folder, vocab_size=min(1024, cfg.vocab_size))
        return folder
