"""Quantized experts through the Engine: greedy tokens of int8 experts against the unquantized
experts, int4 logits against transformers running the same checkpoint with its expert weights
replaced by their dequantized int4 values, and the bytes every policy moves."""

import os
import shutil

import pytest
import torch

from pregated.engine import Engine
from pregated.quantize import QuantSpec, dequantize, quantize
from tiny_models import reference_model

FAMILIES = ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3", "gpt_oss"]
PROMPT = list(range(5, 45))


def greedy(folder, **kw) -> list[int]:
    with Engine(folder, device="cpu", quiet=True, **kw) as eng:
        eng.eos_ids = set()  # random weights may emit eos
        return eng.generate(PROMPT[:6], max_new_tokens=32).token_ids


@pytest.mark.parametrize("family", FAMILIES)
def test_int8_greedy_tokens_equal_the_unquantized_experts_float32(family, checkpoint_factory, kernels):
    """With fp32 activations (the portable kernels) the 32 greedy tokens are identical."""
    kernels("portable")
    folder = checkpoint_factory(family)
    assert greedy(folder, expert_dtype="int8") == greedy(folder)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("family", FAMILIES)
def test_int8_greedy_tokens_are_the_unquantized_choices(family, dtype, checkpoint_factory, kernels):
    """With the CPU's best kernels (AVX2: activations rounded to int8 per group) and in bf16,
    rounding alone can flip a near-tie of a random tiny model, and one flipped tie makes the
    free-running continuations part. Teacher-forced on the int8 continuation, every token int8
    chose is the unquantized experts' own argmax on the same prefix, except near-ties, at most 4
    of the 32: top two logits within 15% of the logits' rms (a router's near-tie that the
    rounding flips sends one token of the context to another expert; the cached keys and values
    of that token then differ a little from the unquantized model's)."""
    kernels("best")
    folder = checkpoint_factory(family, dtype=dtype)
    seq = PROMPT[:6] + greedy(folder, expert_dtype="int8")
    with Engine(folder, device="cpu", quiet=True) as eng:
        logits = eng.logits(seq)[5:-1].float()
    chosen = torch.tensor(seq[6:])
    scale = logits.norm(dim=-1) / logits.shape[-1] ** 0.5
    gap = (logits.max(-1).values - logits.gather(-1, chosen[:, None]).squeeze(-1)) / scale
    assert (gap <= 0.15).all(), f"int8 chose a token far from the unquantized choice: gaps / rms {gap}"
    assert int((gap > 0).sum()) <= 4, f"{int((gap > 0).sum())} of 32 steps were not the unquantized argmax"


def dequantized_reference(folder: str, spec: QuantSpec):
    """transformers' model of `folder` with every routed expert weight replaced by its quantized
    and dequantized value (plain PyTorch, groups along each weight's input dimension)."""
    model = reference_model(folder)
    with torch.no_grad():
        for module in model.modules():
            if not type(module).__name__.endswith("Experts"):
                continue
            transposed = bool(getattr(module, "is_transposed", False))  # [E, in, out] rather than [E, out, in]
            for name, p in module.named_parameters(recurse=False):
                if p.ndim != 3:
                    continue  # biases stay as they are
                for e in range(p.shape[0]):
                    w = p[e].T if transposed else p[e]
                    codes, scale, zero = quantize(w.float(), spec)
                    d = dequantize(codes, scale, zero, spec.group_size).to(p.dtype)
                    p[e].copy_(d.T if transposed else d)
    return model


@pytest.mark.parametrize("isa", ["portable", "best"])
@pytest.mark.parametrize("family,group", [("mixtral", 64), ("qwen3_moe", 32), ("olmoe", 128), ("gpt_oss", 64)])
def test_int4_logits_match_transformers_on_dequantized_weights(family, group, isa, checkpoint_factory, kernels):
    """Stated tolerance, per-token relative error of the logits: below 1e-4 with the portable
    kernels (float32 throughout; only the summation order differs), below 2e-2 with the CPU's
    best kernels (the AVX2 decode kernel rounds activations to int8 per group)."""
    tol = 1e-4 if kernels(isa) == "portable" else 2e-2
    folder = checkpoint_factory(family)
    ref = dequantized_reference(folder, QuantSpec(4, group))
    with torch.no_grad():
        want = ref(torch.tensor([PROMPT])).logits[0].float()
    budget = None
    for policy in ("gpu-only", "pregated"):
        with Engine(folder, device="cpu", quiet=True, expert_dtype="int4", group_size=group, policy=policy,
                    expert_memory=budget) as eng:
            got = eng.logits(PROMPT).float()
            eng.runtime.check()
            budget = 2 * eng.cfg.top_k * eng.cfg.expert_bytes()  # the smallest pregated budget, next
        err = (got - want).norm(dim=-1) / want.norm(dim=-1)
        assert err.max() < tol, f"{policy}: max per-token relative error {err.max():.2e}"


def test_int4_against_dequantized_reference_is_not_the_unquantized_model(checkpoint_factory):
    """The comparison above can fail: the unquantized model is far from int4's logits."""
    folder = checkpoint_factory("mixtral")
    with torch.no_grad():
        dense = reference_model(folder)(torch.tensor([PROMPT])).logits[0].float()
    with Engine(folder, device="cpu", quiet=True, expert_dtype="int4") as eng:
        got = eng.logits(PROMPT).float()
    assert ((got - dense).norm(dim=-1) / dense.norm(dim=-1)).max() > 1e-3


@pytest.fixture(scope="module")
def int4_exact_folder(checkpoint_factory, tmp_path_factory):
    """A mixtral checkpoint whose expert weights are already int4 values (group 64): quantizing
    them again loses nothing, so the int4 and the float32 experts compute the same function and
    route every token alike, and their bytes can be compared for the same routing."""
    folder = str(tmp_path_factory.mktemp("int4-exact"))
    model = dequantized_reference(checkpoint_factory("mixtral"), QuantSpec(4, 64))
    model.save_pretrained(folder)
    src = checkpoint_factory("mixtral")
    for f in os.listdir(src):  # the tokenizer travels along
        if f.startswith("tokenizer") or f == "special_tokens_map.json":
            shutil.copy(os.path.join(src, f), folder)
    return folder


@pytest.mark.parametrize("policy", ["on-demand", "prefetch-all", "pregated"])
def test_int4_moves_the_packed_bytes_of_the_same_copies(policy, int4_exact_folder, kernels):
    """Same routing (the same tokens); every copy moves one packed expert; so a copy under int4
    moves bf16's bytes x (4 + 32 / group) / 16 within 5% (row padding and short groups are the
    rest). The portable kernels keep fp32 activations, so int4-exact weights compute the same
    function. Under on-demand the copies are the misses, the same count for both; with prefetches
    the count depends on the copy thread's timing (a queued prefetch whose slot is evicted before
    it starts is dropped, and one a forward needs first is copied as a demand load that neither
    count sees), so the bytes are compared per copy."""
    kernels("portable")
    runs = {}
    for fmt in (None, "int4"):
        kw = {"expert_dtype": fmt, "group_size": 64} if fmt else {}
        with Engine(int4_exact_folder, device="cpu", quiet=True, **kw) as probe:
            one = probe.cfg.expert_bytes()
        with Engine(int4_exact_folder, device="cpu", quiet=True, policy=policy, expert_memory=6 * one,
                    **kw) as eng:
            tokens = eng.generate(PROMPT[:8], max_new_tokens=12).token_ids
            s = eng.stats()
            eng.runtime.check()
            # a queued prefetch that a forward needs before its copy starts is copied as a demand
            # load and counts as neither a miss nor an issued prefetch: copies >= the two counts
            counted = s["expert_misses"] + s["prefetch_issued"]
            copies, rest = divmod(s["bytes_h2d"], one)
            assert counted > 0 and rest == 0 and copies >= counted, "a copy moved other than one expert's bytes"
            if policy == "on-demand":
                assert copies == counted, "on-demand copied an expert no miss asked for"
            runs[fmt] = (copies, tokens, one, eng.cfg)
    (dense_copies, dense_tokens, dense_one, cfg), (q_copies, q_tokens, q_one, _) = runs[None], runs["int4"]
    assert dense_tokens == q_tokens, "int4 and float32 experts computed differently on int4-exact weights"
    if policy == "on-demand":
        assert dense_copies == q_copies, "int4 and float32 experts routed differently on int4-exact weights"
    cfg.dtype = torch.bfloat16
    bf16_one = cfg.expert_bytes()
    assert bf16_one * 2 == dense_one
    want = bf16_one * (4 + 32 / 64) / 16
    assert abs(q_one / want - 1) < 0.05, f"an int4 copy moved {q_one} bytes, a bf16 one {bf16_one}: {q_one / bf16_one:.4f}"


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_gpu_only_quantized_decode_takes_the_resident_path(fmt, mixtral_folder):
    """gpu-only with quantized experts: decode blocks run on the resident path (no ids to the
    host; on a GPU the graph step can capture them), prefill blocks through the general path
    (more rows than the resident path takes for quantized experts); the tokens are the general
    path's, and those of the graph step run uncaptured."""
    prompts = [list(range(5, 45)), list(range(50, 60))]  # 2 x 40 x 2 prefill rows: the general path
    with Engine(mixtral_folder, device="cpu", quiet=True, expert_dtype=fmt) as eng:
        assert eng.policy == "gpu-only"
        eng.eos_ids = set()
        eng.reset_stats()
        got = eng.generate(prompts, max_new_tokens=12)
        s = eng.stats()
        assert s["resident_forwards"] == 11 * eng.cfg.num_moe_layers, "every decode block on the resident path"
        assert s["forwards"] == s["resident_forwards"] + eng.cfg.num_moe_layers, "the prefill on the general path"
        eng.moe.score_pregate = True  # needs the routing on the host: the general path everywhere
        want = eng.generate(prompts, max_new_tokens=12)
        eng.moe.score_pregate = False
        assert [r.token_ids for r in got] == [r.token_ids for r in want]
        eng.graph_mode = "eager"
        graphed = eng.generate(prompts, max_new_tokens=12)
        assert eng.stats()["graph_steps"] == 11
        assert [r.token_ids for r in graphed] == [r.token_ids for r in want]
