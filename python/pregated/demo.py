"""The embedded default model of `pregated demo`: a small Mixtral-style checkpoint with random
weights and a byte-level BPE tokenizer trained here, built once into a cache folder.

Nothing is downloaded and transformers is not needed: the checkpoint is written with
safetensors in the Hugging Face layout (per-expert tensor names, sharded).
"""

from __future__ import annotations

import json
import os
import shutil

import torch

from .checkpoint import ShardWriter

DEMO_VERSION = 2

DEMO_CONFIG = {
    "architectures": ["MixtralForCausalLM"],
    "model_type": "mixtral",
    "hidden_size": 256,
    "intermediate_size": 512,
    "num_hidden_layers": 4,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "num_local_experts": 8,
    "num_experts_per_tok": 2,
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-5,
    "rope_theta": 1000000.0,
    "hidden_act": "silu",
    "tie_word_embeddings": False,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 0,
    "torch_dtype": "bfloat16",
}

CORPUS = """\
A mixture-of-experts model sends every token to a few of its many experts. The experts of a
large model do not fit in the memory of one GPU, so they live in host memory and travel over
PCIe when a block needs them. Waiting for them is slow; guessing them early is fast. The
pre-gate of block i guesses the experts of block i+1 while block i computes, and the copy
engine moves them in the meantime. A cache keeps the experts that are used again. Tokens,
layers, experts, slots, bytes and seconds: everything is counted, nothing is assumed.
Bonjour, ça va? Grüße aus München. 日本語も少し。 Ελληνικά. 🙂
"""

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}[{{ message['role'] | upper }}] "
    "{{ message['content'] }}{{ eos_token }}\n{% endfor %}"
    "{% if add_generation_prompt %}[ASSISTANT] {% endif %}"
)


def cache_root() -> str:
    return os.environ.get("PREGATED_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "pregated")


def demo_folder() -> str:
    return os.path.join(cache_root(), f"demo-mixtral-v{DEMO_VERSION}")


def train_tokenizer(folder: str, vocab_size: int = 1024, texts: list[str] | None = None) -> int:
    """A byte-pair tokenizer trained on `texts` (default: the demo's corpus), written into
    `folder` with its config and chat template; returns its vocabulary size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    # Metaspace (SentencePiece-like) rather than byte-level: every token of the vocabulary is
    # whole characters, so even random weights print readable (if meaningless) text.
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<s>", "</s>", "<unk>"],
                                  show_progress=False)
    tok.train_from_iterator(texts or [CORPUS] * 8, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok.save(os.path.join(folder, "tokenizer.json"))
    with open(os.path.join(folder, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump({"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>",
                   "tokenizer_class": "PreTrainedTokenizerFast", "chat_template": CHAT_TEMPLATE}, f, indent=1)
    return tok.get_vocab_size()


def _weights(cfg: dict, seed: int):
    """Yields (name, tensor) in bfloat16: the Mixtral layout with per-expert names."""
    g = torch.Generator().manual_seed(seed)
    H, I, V = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    D = H // cfg["num_attention_heads"]
    kv = cfg["num_key_value_heads"] * D

    def rand(*shape, std=0.06):
        return (torch.randn(*shape, generator=g) * std).to(torch.bfloat16)

    yield "model.embed_tokens.weight", rand(V, H, std=1.0)
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}"
        yield f"{p}.input_layernorm.weight", torch.ones(H, dtype=torch.bfloat16)
        yield f"{p}.post_attention_layernorm.weight", torch.ones(H, dtype=torch.bfloat16)
        yield f"{p}.self_attn.q_proj.weight", rand(H, H)
        yield f"{p}.self_attn.k_proj.weight", rand(kv, H)
        yield f"{p}.self_attn.v_proj.weight", rand(kv, H)
        yield f"{p}.self_attn.o_proj.weight", rand(H, H)
        yield f"{p}.block_sparse_moe.gate.weight", rand(cfg["num_local_experts"], H, std=0.3)
        for e in range(cfg["num_local_experts"]):
            q = f"{p}.block_sparse_moe.experts.{e}"
            yield f"{q}.w1.weight", rand(I, H)
            yield f"{q}.w3.weight", rand(I, H)
            yield f"{q}.w2.weight", rand(H, I)
    yield "model.norm.weight", torch.ones(H, dtype=torch.bfloat16)
    yield "lm_head.weight", rand(V, H, std=0.2)


def demo_model() -> str:
    """The folder of the embedded demo checkpoint (built on first use, then reused): a model
    folder in Hugging Face layout to try every API on, offline."""
    return build_demo()


def build_demo(folder: str | None = None, seed: int = 0, force: bool = False) -> str:
    """Builds the demo checkpoint once; returns its folder."""
    folder = folder or demo_folder()
    if os.path.isfile(os.path.join(folder, "model.safetensors.index.json")) and not force:
        return folder
    tmp = folder + ".partial"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    cfg = dict(DEMO_CONFIG)
    cfg["vocab_size"] = train_tokenizer(tmp)
    with open(os.path.join(tmp, "config.json"), "w", encoding="utf-8") as f:
        json.dump(cfg, f, indent=1)
    with open(os.path.join(tmp, "generation_config.json"), "w", encoding="utf-8") as f:
        json.dump({"bos_token_id": 1, "eos_token_id": 2}, f)
    # One shard per decoder layer, plus one for embeddings and head.
    shards: dict[str, dict[str, torch.Tensor]] = {}
    for name, t in _weights(cfg, seed):
        key = name.split(".")[2] if name.startswith("model.layers.") else "other"
        shards.setdefault(key, {})[name] = t
    writer = ShardWriter(tmp)
    for _, tensors in sorted(shards.items()):
        writer.add(tensors)
    writer.finish()
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)
    return folder
