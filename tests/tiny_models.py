"""Tiny random-weight checkpoints of every supported family, made with transformers.

Each is saved with `save_pretrained` (sharded, per-expert or fused expert names) next to a
byte-level BPE tokenizer trained here, with a chat template.
"""

from __future__ import annotations

import os

import torch

CORPUS = [
    "The quick brown fox jumps over the lazy dog. " * 3,
    "Mixture of experts models route each token to a few experts. ",
    "Experts live in host memory and move to the GPU before they are needed. ",
    "héllo wörld, ça va? naïve café. 日本語のテキスト。 Ελληνικά. emoji 🙂🚀 ",
    "def main():\n    return 42\n",
    "0123456789 + - * / = ( ) [ ] { } < > ",
]

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'system' %}<<SYS>>{{ message['content'] | trim }}<</SYS>>\n"
    "{% else %}[{{ message['role'] | upper }}] {{ message['content'] }}{{ eos_token }}\n{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}[ASSISTANT] {% endif %}"
)


def make_tokenizer(folder: str, vocab_size: int = 400):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS * 4, trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", bos)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(folder)
    return fast


def family_config(family: str, vocab: int, **over):
    import transformers

    common = dict(vocab_size=vocab, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, num_experts_per_tok=2, max_position_embeddings=512,
                  initializer_range=0.08, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                  rms_norm_eps=1e-5)
    specific = {
        "mixtral": (transformers.MixtralConfig, dict(intermediate_size=48, num_local_experts=8)),
        "qwen2_moe": (transformers.Qwen2MoeConfig, dict(
            intermediate_size=80, moe_intermediate_size=40, shared_expert_intermediate_size=56,
            num_experts=8, norm_topk_prob=False, mlp_only_layers=[1])),
        "qwen3_moe": (transformers.Qwen3MoeConfig, dict(
            intermediate_size=80, moe_intermediate_size=40, num_experts=8, head_dim=24, norm_topk_prob=True)),
        "olmoe": (transformers.OlmoeConfig, dict(intermediate_size=40, num_experts=8, norm_topk_prob=False)),
    }
    cls, kw = specific[family]
    return cls(**{**common, **kw, **over})


def make_checkpoint(folder: str, family: str, dtype=torch.float32, fused=False, seed=0, **over) -> str:
    """Writes a checkpoint (sharded) and its tokenizer into `folder`; returns the folder."""
    from transformers import AutoModelForCausalLM

    os.makedirs(folder, exist_ok=True)
    tok = make_tokenizer(folder)
    torch.manual_seed(seed)
    cfg = family_config(family, len(tok), **over)
    model = AutoModelForCausalLM.from_config(cfg).to(dtype)
    try:
        model.save_pretrained(folder, max_shard_size="200KB", save_original_format=not fused)
    except TypeError:  # a transformers without the option writes its default naming
        model.save_pretrained(folder, max_shard_size="200KB")
    return folder


def reference_model(folder: str, dtype=torch.float32):
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, experts_implementation="eager").eval()
    except TypeError:
        return AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).eval()
