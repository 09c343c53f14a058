"""The quality cost of quantized experts: perplexity, top-1 agreement with the unquantized model's
next token and the mean KL divergence of next-token distributions (`pregated eval --expert-dtype`)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _windows(ids: list[int], window: int):
    for s in range(0, len(ids), window):
        chunk = ids[s:s + window]
        if len(chunk) >= 2:
            yield chunk


def next_token_log_probs(engine, ids: list[int], window: int) -> list[torch.Tensor]:
    """Per non-overlapping window, log-probabilities [len - 1, vocab] of each next token (float32, CPU)."""
    return [torch.log_softmax(engine.logits(chunk)[:-1].float(), -1).cpu() for chunk in _windows(ids, window)]


def compare(reference: list[torch.Tensor], candidate: list[torch.Tensor], ids: list[int], window: int) -> dict:
    """perplexity of `candidate`, its top-1 agreement with `reference` and mean KL(reference || candidate)."""
    nll = kl = agree = count = 0.0
    for ref, cand, chunk in zip(reference, candidate, _windows(ids, window)):
        target = torch.tensor(chunk[1:])
        nll += float(F.nll_loss(cand, target, reduction="sum"))
        kl += float((ref.exp() * (ref - cand)).sum())
        agree += int((ref.argmax(-1) == cand.argmax(-1)).sum())
        count += len(chunk) - 1
    if count == 0:
        raise ValueError("the evaluation text has fewer than 2 tokens")
    return {"perplexity": math.exp(nll / count), "top1_agreement": agree / count, "mean_kl": kl / count}


def expert_dtype_quality(model, ids: list[int], expert_dtypes, *, window: int, group_size: int = 64,
                         quantize: str = "rtn", progress=None, **engine_args) -> list[dict]:
    """One row for the unquantized experts, then one per entry of `expert_dtypes`, each computed by
    its own Engine on the same token ids and windows (exact routing)."""
    from .engine import Engine

    with Engine(model, **engine_args) as eng:
        reference = next_token_log_probs(eng, ids, window)
        dense_bytes = eng.cfg.expert_bytes()
    rows = [{"expert_dtype": "model", "expert_bytes": dense_bytes, **compare(reference, reference, ids, window)}]
    for name in expert_dtypes:
        if progress:
            progress(name)
        with Engine(model, expert_dtype=name, group_size=group_size, quantize=quantize, **engine_args) as eng:
            got = next_token_log_probs(eng, ids, window)
            rows.append({"expert_dtype": name, "expert_bytes": eng.cfg.expert_bytes(),
                         **compare(reference, got, ids, window)})
    return rows
