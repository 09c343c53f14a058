"""Tiny random-weight checkpoints of every MoE family transformers runs, made with transformers.

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


def make_checkpoint(folder: str, family: str, dtype=torch.float32, fused=False, seed=0, **over) -> str:
    """Writes a checkpoint (sharded) and its tokenizer into `folder`; returns the folder."""
    from transformers import AutoModelForCausalLM

    os.makedirs(folder, exist_ok=True)
    tok = make_tokenizer(folder)
    torch.manual_seed(seed)
    cfg = tiny_config(family, len(tok), **over)
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


# --- every MoE family transformers runs through its experts interface ------------------------

# Small values for the config fields MoE families share; each family takes the ones its config
# class accepts (everything else keeps the family's default).
TINY = dict(
    hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
    intermediate_size=80, moe_intermediate_size=40, shared_expert_intermediate_size=56,
    num_experts=8, num_local_experts=8, n_routed_experts=8, moe_num_experts=8, num_experts_per_tok=2,
    moe_k=2, n_shared_experts=1, num_shared_experts=1, moe_num_shared_experts=1, first_k_dense_replace=1,
    n_group=2, topk_group=1, kv_lora_rank=16, q_lora_rank=24, qk_rope_head_dim=8, qk_nope_head_dim=16,
    v_head_dim=16, linear_num_value_heads=4, linear_num_key_heads=2, linear_key_head_dim=16,
    linear_value_head_dim=16, max_position_embeddings=512, initializer_range=0.08, rms_norm_eps=1e-5,
    bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False,
)
# Family-specific values that the shared ones do not cover.
_MLA = dict(num_key_value_heads=4)  # multi-head latent attention: as many key/value heads as query heads
FAMILY_TINY = {
    "mixtral": dict(intermediate_size=48),
    "qwen2_moe": dict(mlp_only_layers=[1]),
    "qwen3_moe": dict(head_dim=24, norm_topk_prob=True),
    "olmoe": dict(intermediate_size=40, num_key_value_heads=4),
    **{t: _MLA for t in ("deepseek_v2", "deepseek_v3", "deepseek_v32", "glm4_moe_lite", "glm_moe_dsa", "axk1", "axk2")},
    # hybrid families: one linear-attention layer, the others full attention
    "bailing_hybrid": dict(layer_types=["linear_attention", "full_attention", "full_attention"], **_MLA),
    "kimi_linear": dict(layer_types=["linear_attention", "full_attention", "full_attention"], **_MLA),
    "qwen3_next": dict(layer_types=["linear_attention", "full_attention", "full_attention"]),
    "granitemoehybrid": dict(layer_types=["mamba", "attention", "attention"]),
    "jamba": dict(num_hidden_layers=4, attn_layer_period=2, attn_layer_offset=1, expert_layer_period=1,
                  expert_layer_offset=0),
    "lfm2_moe": dict(layer_types=["conv", "full_attention", "full_attention"], num_dense_layers=1),
    "beam": dict(mlp_layer_types=["dense", "sparse", "sparse"]),
    "qwen3_5_moe_text": dict(layer_types=["linear_attention", "full_attention", "full_attention"]),
    "qwen4_exp_text": dict(layer_types=["linear_attention", "full_attention", "full_attention"]),
    "dots3_note_text": _MLA,
    "zaya": dict(num_experts_per_tok=1),
    "gemma4_text": dict(enable_moe_block=True, top_k_experts=2, vocab_size_per_layer_input=400,
                        hidden_size_per_layer_input=16, per_layer_config={}, global_head_dim=16),
}


def moe_model_types() -> list[str]:
    """Every model type with a causal LM class whose modeling code routes experts through
    transformers' experts interface (`use_experts_implementation`), read off transformers."""
    import importlib.util

    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES, model_type_to_module_name
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    out = []
    for model_type in sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES):
        if model_type not in CONFIG_MAPPING_NAMES:
            continue
        spec = importlib.util.find_spec(f"transformers.models.{model_type_to_module_name(model_type)}")
        if spec is None or spec.origin is None:
            continue
        folder = os.path.dirname(spec.origin)
        sources = [os.path.join(folder, f) for f in os.listdir(folder) if f.startswith("modeling_") and f.endswith(".py")]
        if any("use_experts_implementation" in open(f, encoding="utf-8").read() for f in sources):
            out.append(model_type)
    return out


def tiny_config(model_type: str, vocab: int, **over):
    import inspect

    from transformers import AutoConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    cls = CONFIG_MAPPING[model_type]
    accepted = set(inspect.signature(cls.__init__).parameters)
    values = {**TINY, **FAMILY_TINY.get(model_type, {}), **over, "vocab_size": vocab}
    kwargs = {k: v for k, v in values.items() if k in accepted or k in ("vocab_size",)}
    return AutoConfig.for_model(model_type, **kwargs)
