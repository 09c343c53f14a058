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

from .config import dtype_name

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
                          "norm_topk_prob": False, "rope_theta": 1e6},
    # the CPU comparison of the wave's issues: 8 layers, 8 experts top-2, hidden 512
    "mixtral-cpu": {"model_type": "mixtral", "vocab_size": 32000, "hidden_size": 512, "num_hidden_layers": 8,
                    "num_attention_heads": 8, "num_key_value_heads": 2, "intermediate_size": 1536,
                    "num_local_experts": 8, "num_experts_per_tok": 2, "rope_theta": 1e6},
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
        from transformers import AutoConfig

        if name not in SHAPES:
            raise ValueError(f"unknown synthetic model '{name}': choose one of {', '.join(SHAPES)}")
        raw = {**_COMMON, **SHAPES[name], "dtype": dtype}
        if layers is not None:
            if not 1 <= layers <= raw["num_hidden_layers"]:
                raise ValueError(f"--layers must be in 1..{raw['num_hidden_layers']} for {name}, got {layers}")
            raw["num_hidden_layers"] = layers
        self.name = name
        self.raw = raw
        kwargs = {k: v for k, v in raw.items() if k != "model_type"}
        self.hf_config = AutoConfig.for_model(raw["model_type"], **kwargs)
        self.tokenizer = NullTokenizer()
        self.seed = seed
        self.pool = pool
        self._config = None

    def __repr__(self):
        return f"SyntheticModel({self.name!r}, layers={self.raw['num_hidden_layers']})"

    @property
    def config(self):
        """pregated's summary of the model (built on the meta device; nothing is allocated)."""
        if self._config is None:
            from .config import checkpoint_dtype
            from .modeling import build_model, describe

            dtype = checkpoint_dtype(self.hf_config)
            self._config = describe(self.hf_config, build_model(self.hf_config, dtype), dtype)[2]
        return self._config

    # --- weights --------------------------------------------------------------------------

    def dense_tensors(self, meta_state: dict, skip, device, dtype):
        """name -> random tensor for every tensor of the model but the experts' (`skip`)."""
        g = torch.Generator(device=device).manual_seed(self.seed)
        out = {}
        for name, p in meta_state.items():
            if name in skip:
                continue
            if not p.is_floating_point():
                out[name] = torch.zeros(p.shape, device=device, dtype=p.dtype)
            elif name.endswith("norm.weight") or "layernorm" in name:
                out[name] = torch.ones(p.shape, device=device, dtype=p.dtype)
            elif name.endswith("bias") or p.dim() < 2:
                out[name] = torch.zeros(p.shape, device=device, dtype=p.dtype)
            else:
                std = 1.0 if "embed_tokens" in name else p.shape[-1] ** -0.5
                out[name] = (torch.randn(p.shape, generator=g, device=device) * std).to(p.dtype)
        return out

    def expert_pool(self, layout, dtype):
        """A few random experts ({parameter: one expert's slice, model layout}) that fill every
        expert of the model."""
        g = torch.Generator().manual_seed(self.seed + 1)
        pool = []
        for _ in range(self.pool):
            expert = {}
            for name in layout.params:
                shape = layout.param_shape(name)
                fan_in = shape[0] if layout.is_transposed and len(shape) == 2 else shape[-1]
                scale = 0.1 if name.endswith("_bias") else fan_in ** -0.5
                expert[name] = (torch.randn(shape, generator=g) * scale).to(dtype)
            pool.append(expert)
        return pool

    def build(self, dtype: torch.dtype):
        from .modeling import build_model

        return build_model(self.hf_config, dtype)

    def pooled(self, m: int, e: int) -> int:
        return (m * 7 + e) % self.pool

    def load(self, model, blocks, layout, meta_state, set_expert, device, dtype, progress=None) -> None:
        from .loading import finish_on_device, set_tensor

        skip = {f"{b.path}.{p}" for b in blocks for p in layout.params}
        dense = self.dense_tensors(meta_state, skip, device, dtype)
        for name, t in dense.items():
            set_tensor(model, name, t)
        pool = self.expert_pool(layout, dtype)
        for m in range(len(blocks)):
            for e in range(layout.num_experts):
                for name, t in pool[self.pooled(m, e)].items():
                    for part, w in layout.store_parts(name, t).items():
                        set_expert(m, e, part, w.contiguous())
                if progress is not None:
                    progress.update(sum(t.numel() for t in pool[0].values()))
        finish_on_device(model, device, set(dense))

    def parameters(self) -> int:
        from .config import checkpoint_dtype
        from .modeling import build_model

        model = build_model(self.hf_config, checkpoint_dtype(self.hf_config))
        return sum(p.numel() for p in model.parameters())

    # --- as files -------------------------------------------------------------------------

    def save(self, folder: str, dtype=torch.bfloat16, progress: bool = False) -> str:
        """Writes the model as a Hugging Face checkpoint (sharded, the model's fused expert
        tensors), one decoder layer in memory at a time."""
        from tqdm.auto import tqdm

        from .checkpoint import ShardWriter
        from .demo import train_tokenizer
        from .modeling import build_model, describe

        os.makedirs(folder, exist_ok=True)
        model = build_model(self.hf_config, dtype)
        blocks, layout, cfg = describe(self.hf_config, model, dtype)
        meta_state = dict(model.state_dict())
        experts = {f"{b.path}.{p}": (m, p) for m, b in enumerate(blocks) for p in layout.params}
        pool = self.expert_pool(layout, dtype)
        writer = ShardWriter(folder)

        def layer_of(name):
            parts = name.split(".")
            return int(parts[2]) if parts[:2] == ["model", "layers"] else None

        names = [n for n in meta_state if n not in experts]
        writer.add(self.dense_tensors({n: meta_state[n] for n in names if layer_of(n) is None}, (), "cpu", dtype))
        for i in tqdm(range(cfg.num_layers), desc="saving", disable=not progress):
            tensors = self.dense_tensors({n: meta_state[n] for n in names if layer_of(n) == i}, (), "cpu", dtype)
            for full, (m, p) in experts.items():
                if layer_of(full) == i:
                    tensors[full] = torch.stack([pool[self.pooled(m, e)][p] for e in range(layout.num_experts)])
            writer.add(tensors)
        writer.finish()
        raw = self.hf_config.to_dict()
        raw["dtype"] = dtype_name(dtype)
        raw["architectures"] = [type(model).__name__]
        with open(os.path.join(folder, "config.json"), "w", encoding="utf-8") as f:
            json.dump(raw, f, indent=1)
        train_tokenizer(folder, vocab_size=min(1024, cfg.vocab_size))
        return folder
