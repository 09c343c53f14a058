"""pregated.from_pretrained: transformers' own model with offloaded experts, used through
transformers' generate() and pipeline()."""

import pytest
import torch

import pregated
from tiny_models import reference_model


@pytest.fixture(scope="module")
def offloaded(mixtral_folder):
    probe = pregated.Engine(mixtral_folder, device="cpu", quiet=True)
    budget = 2 * probe.cfg.top_k * probe.cfg.expert_bytes()
    probe.close()
    model = pregated.from_pretrained(mixtral_folder, device="cpu", policy="pregated", expert_memory=budget,
                                     quiet=True)
    yield model
    model.pregated.close()


def test_transformers_generate_through_offloaded_experts(offloaded, mixtral_folder):
    import transformers

    assert isinstance(offloaded, transformers.PreTrainedModel)
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    ref = reference_model(mixtral_folder)
    with torch.no_grad():
        want = ref.generate(ids, max_new_tokens=16, min_new_tokens=16, do_sample=False)
        got = offloaded.generate(ids, max_new_tokens=16, min_new_tokens=16, do_sample=False)
        assert torch.equal(got, want)
        assert torch.allclose(offloaded(ids).logits, ref(ids).logits, rtol=1e-4, atol=1e-5)
    s = offloaded.pregated.stats()
    assert s["policy"] == "pregated" and s["bytes_h2d"] > 0 and s["prefetch_issued"] > 0
    offloaded.pregated.runtime.check()


def test_transformers_pipeline(offloaded, mixtral_folder):
    from transformers import AutoTokenizer, pipeline

    tok = AutoTokenizer.from_pretrained(mixtral_folder)
    kw = dict(max_new_tokens=12, min_new_tokens=12, do_sample=False)
    got = pipeline("text-generation", model=offloaded, tokenizer=tok)("Experts live in", **kw)
    want = pipeline("text-generation", model=reference_model(mixtral_folder), tokenizer=tok)("Experts live in", **kw)
    assert got[0]["generated_text"] == want[0]["generated_text"]


def test_experts_without_an_expert_store_say_what_to_do(mixtral_folder):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(mixtral_folder, experts_implementation="pregated")
    with pytest.raises(RuntimeError, match=r"has no expert store: load the model with pregated.from_pretrained"):
        model(torch.tensor([[5, 6, 7]]))


def test_offload_a_model_transformers_loaded(mixtral_folder):
    """AutoModelForCausalLM.from_pretrained(..., experts_implementation="pregated") plus
    pregated.offload(...): the same model as pregated.from_pretrained."""
    from transformers import AutoModelForCausalLM

    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    ref = reference_model(mixtral_folder)
    with torch.no_grad():
        want = ref.generate(ids, max_new_tokens=12, min_new_tokens=12, do_sample=False)
    model = AutoModelForCausalLM.from_pretrained(mixtral_folder, experts_implementation="pregated")
    one = pregated.Engine(mixtral_folder, device="cpu", quiet=True)
    budget = 2 * one.cfg.top_k * one.cfg.expert_bytes()
    one.close()
    assert pregated.offload(model, device="cpu", policy="pregated", expert_memory=budget) is model
    try:
        with torch.no_grad():
            assert torch.equal(model.generate(ids, max_new_tokens=12, min_new_tokens=12, do_sample=False), want)
        assert not any("experts" in n for n, _ in model.named_parameters())  # the store holds them
        assert model.pregated.stats()["bytes_h2d"] > 0
        assert model.pregated.generate(ids[0], max_new_tokens=12).token_ids == want[0, 6:].tolist()
    finally:
        model.pregated.close()
