"""SwitchTransformers (encoder-decoder, top-1 routing with expert capacity, ReLU experts, no
experts interface in transformers) through pregated's adapter, against transformers'
SwitchTransformersForConditionalGeneration."""

import os

import pytest
import torch

import pregated
from tiny_models import make_tokenizer

IDS = torch.tensor([[5, 6, 7, 8, 9, 10, 11, 12], [40, 41, 42, 43, 44, 45, 46, 47]])


@pytest.fixture(scope="module")
def switch_folder(tmp_path_factory):
    import transformers

    folder = str(tmp_path_factory.mktemp("switch"))
    tok = make_tokenizer(folder)
    torch.manual_seed(0)
    cfg = transformers.SwitchTransformersConfig(
        vocab_size=len(tok), d_model=64, d_ff=96, d_kv=16, num_heads=4, num_layers=2, num_decoder_layers=2,
        num_experts=8, expert_capacity=6, encoder_sparse_step=1, decoder_sparse_step=1, initializer_factor=4.0,
        pad_token_id=0, eos_token_id=2, decoder_start_token_id=0)
    transformers.SwitchTransformersForConditionalGeneration(cfg).save_pretrained(folder, max_shard_size="200KB")
    return folder


@pytest.fixture(scope="module")
def reference(switch_folder):
    import transformers

    return transformers.SwitchTransformersForConditionalGeneration.from_pretrained(switch_folder).eval()


GEN = dict(max_new_tokens=16, min_new_tokens=16, do_sample=False, suppress_tokens=[0])


@pytest.mark.parametrize("policy", ["gpu-only", "pregated"])
def test_switch_transformers_parity(switch_folder, reference, policy):
    budget = None
    if policy == "pregated":
        with pregated.Engine(switch_folder, device="cpu", quiet=True) as probe:
            budget = 2 * probe.cfg.expert_bytes()  # top-1: this block's expert and the next one's
            assert probe.cfg.is_encoder_decoder and probe.cfg.num_moe_layers == 4 and probe.cfg.ffn == "relu"
    model = pregated.from_pretrained(switch_folder, device="cpu", policy=policy, expert_memory=budget, quiet=True)
    try:
        dec = torch.tensor([[0, 30, 31, 32, 33]] * 2)
        with torch.no_grad():
            # the capacity of 6 tokens per expert drops tokens of these 8-token inputs
            want = reference(input_ids=IDS, decoder_input_ids=dec).logits
            got = model(input_ids=IDS, decoder_input_ids=dec).logits
            assert ((got - want).norm(dim=-1) / want.norm(dim=-1)).max() < 1e-4
            assert torch.equal(model.generate(IDS, **GEN), reference.generate(IDS, **GEN))
        s = model.pregated.stats()
        if policy == "pregated":
            assert s["bytes_h2d"] > 0 and s["expert_hits"] + s["expert_misses"] > 0
        else:  # every expert pinned: the resident path
            assert s["resident_forwards"] > 0
        model.pregated.runtime.check()
    finally:
        model.pregated.close()


def test_switch_through_engine_generate(switch_folder, reference):
    with pregated.Engine(switch_folder, device="cpu", quiet=True) as eng:
        eng.eos_ids = set()
        with torch.no_grad():
            want = reference.generate(IDS[:1], max_new_tokens=12, min_new_tokens=12, do_sample=False)[0, 1:].tolist()
        assert eng.generate(IDS[0], max_new_tokens=12).token_ids == want
        with pytest.raises(ValueError, match="needs a decoder-only model"):
            eng.logits([5, 6, 7])
