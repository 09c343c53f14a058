"""Pre-gates: predictors of block m+1's experts from block m's hidden state.

speculative  block m+1's own norm and router applied to block m's residual stream (needs only
             the checkpoint; Eliseev & Mazur's speculative loading)
trained      the same shape (RMSNorm weight, router weight, bias) fitted on calibration text to
             block m+1's true routing distribution, starting from the speculative one

T = tokens, H = hidden, E = experts per layer, K = experts per token, N = calibration tokens.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from .moe import route, route_logits, token_hits

FORMAT_VERSION = 1
FILE = "pregate.safetensors"


class PregateError(ValueError):
    """A pre-gate folder is missing, unreadable or does not match the model."""


class SpeculativePregate:
    kind = "speculative"

    def __init__(self, model, cfg):
        layers = model.model.layers
        self.cfg = cfg
        self.routers = [layers[i].mlp.gate for i in cfg.moe_layers]
        self.norms = [layers[i].post_attention_layernorm for i in cfg.moe_layers]

    def predict(self, m: int, h: torch.Tensor):
        """h: [T, H] residual stream at block m -> (ids, weights) for block m + 1."""
        return route(self.routers[m + 1], self.norms[m + 1](h), self.cfg)


class TrainedPregate:
    kind = "trained"

    def __init__(self, cfg, tensors: dict[str, torch.Tensor], device, eps: float):
        self.cfg = cfg
        self.eps = eps
        n = cfg.num_moe_layers - 1
        self.norm = [tensors[f"block.{m}.norm"].to(device) for m in range(n)]
        self.weight = [tensors[f"block.{m}.weight"].to(device) for m in range(n)]
        self.bias = [tensors[f"block.{m}.bias"].to(device) for m in range(n)]

    def logits(self, m: int, h: torch.Tensor) -> torch.Tensor:
        return predictor_logits(h.float(), self.norm[m], self.weight[m], self.bias[m], self.eps)

    def predict(self, m: int, h: torch.Tensor):
        return route_logits(self.logits(m, h), self.cfg)


def predictor_logits(h, norm_w, weight, bias, eps):
    """The trained pre-gate: router(rmsnorm(h)) with its own norm weight, router weight and bias."""
    x = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps) * norm_w
    return F.linear(x, weight, bias)


# --- matching a pre-gate to its model ---------------------------------------------------

def model_fingerprint(model, cfg) -> dict:
    """What a pre-gate must agree with: the architecture and the routers' weights."""
    digest = hashlib.sha256()
    for i in cfg.moe_layers:
        digest.update(model.model.layers[i].mlp.gate.weight.detach().float().cpu().numpy().tobytes())
    return {"model_type": cfg.model_type, "num_moe_layers": cfg.num_moe_layers, "num_experts": cfg.num_experts,
            "hidden_size": cfg.hidden_size, "top_k": cfg.top_k, "routers_sha256": digest.hexdigest()}


def load_pregate(folder: str, model, cfg, device) -> TrainedPregate:
    meta_path, path = os.path.join(folder, "pregate.json"), os.path.join(folder, FILE)
    if not os.path.isdir(folder):
        raise PregateError(f"pre-gate folder {folder} does not exist; make one with `pregated calibrate`")
    for p in (meta_path, path):
        if not os.path.isfile(p):
            raise PregateError(f"{p} does not exist: {folder} is not a pre-gate folder (`pregated calibrate --out`)")
    try:
        with open(meta_path, encoding="utf-8") as f:
            meta = json.load(f)
        tensors = load_file(path)
    except Exception as e:
        raise PregateError(f"cannot read the pre-gate in {folder} ({e}); calibrate again") from e
    if meta.get("format_version") != FORMAT_VERSION:
        raise PregateError(f"{meta_path}: format version {meta.get('format_version')} is not {FORMAT_VERSION}; calibrate again")
    want = model_fingerprint(model, cfg)
    for key, value in want.items():
        got = meta.get("model", {}).get(key)
        if got != value:
            what = "router weights" if key == "routers_sha256" else f"{key} {got}"
            raise PregateError(
                f"pre-gate {folder} does not match this model: it was calibrated for {what}"
                + ("" if key == "routers_sha256" else f", this model has {value}")
                + " (a different checkpoint); calibrate it for this model")
    for m in range(cfg.num_moe_layers - 1):
        for name, shape in ((f"block.{m}.norm", (cfg.hidden_size,)), (f"block.{m}.weight", (cfg.num_experts, cfg.hidden_size)),
                            (f"block.{m}.bias", (cfg.num_experts,))):
            if name not in tensors or tuple(tensors[name].shape) != shape:
                raise PregateError(f"{path}: tensor {name} is missing or not of shape {list(shape)}; calibrate again")
    return TrainedPregate(cfg, tensors, device, cfg.rms_norm_eps)


# --- calibration --------------------------------------------------------------------------

@dataclass
class BlockData:
    h: list        # [n, H] float32 chunks: block m's residual stream
    probs: list    # [n, E] float32 chunks: block m's own router distribution
    ids: list      # [n, K] chunks: block m's routed experts


class Recorder:
    """Collects, per MoE block, the residual stream and the true routing (a MoEExecutor hook)."""

    def __init__(self, cfg):
        self.cfg = cfg
        self.blocks = [BlockData([], [], []) for _ in range(cfg.num_moe_layers)]

    def __call__(self, m: int, h: torch.Tensor, router_logits: torch.Tensor, ids: torch.Tensor) -> None:
        b = self.blocks[m]
        b.h.append(h.float().cpu())
        b.probs.append(torch.softmax(router_logits.float(), -1).cpu())
        b.ids.append(ids.cpu())

    def h(self, m: int) -> torch.Tensor:
        return torch.cat(self.blocks[m].h)

    def probs(self, m: int) -> torch.Tensor:
        return torch.cat(self.blocks[m].probs)

    def ids(self, m: int) -> torch.Tensor:
        return torch.cat(self.blocks[m].ids)


def overlap(pred_ids: torch.Tensor, true_ids: torch.Tensor) -> tuple[float, float]:
    """Per-token precision and recall of predicted expert sets, averaged: [N, K'] vs [N, K]."""
    hit = token_hits(pred_ids, true_ids).float()  # [N]
    return float((hit / pred_ids.shape[1]).mean()), float((hit / true_ids.shape[1]).mean())


def fit_block(h, probs_next, norm_w, weight, eps, steps: int, lr: float, seed: int = 0):
    """Fits (norm, weight, bias) so that softmax(predictor(h)) matches block m+1's router
    distribution (KL divergence), starting from the speculative pre-gate. The last tenth of the
    training tokens picks between the fitted and the starting parameters."""
    n = h.shape[0]
    n_val = max(1, n // 10)
    val = slice(n - n_val, n)  # training draws from [0, n - n_val)
    params = [norm_w.detach().float().clone().requires_grad_(True),
              weight.detach().float().clone().requires_grad_(True),
              torch.zeros(weight.shape[0], requires_grad=True)]
    start = [p.detach().clone() for p in params]
    opt = torch.optim.Adam(params, lr=lr)
    g = torch.Generator().manual_seed(seed)
    batch = min(4096, n - n_val)

    def loss_on(sl, ps):
        logq = torch.log_softmax(predictor_logits(h[sl], *ps, eps), -1)
        return -(probs_next[sl] * logq).sum(-1).mean()

    for _ in range(steps):
        loss = loss_on(torch.randint(0, n - n_val, (batch,), generator=g), params)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        fitted = [p.detach() for p in params]
        if loss_on(val, fitted) > loss_on(val, start):
            fitted = start
    return fitted


def calibrate(model: str, text: str, out: str, *, device=None, dtype=None, expert_memory=None,
              window: int | None = None, held_out: float = 0.2, steps: int = 300, lr: float = 3e-3,
              quiet: bool = False, log=print) -> dict:
    """Fits a trained pre-gate for every MoE block on `text` and writes it to `out`.

    The last `held_out` fraction of the text's tokens is not trained on; the report gives, per
    block and overall, precision and recall of the predicted experts on it for the
    speculative and the trained pre-gate.
    """
    from .engine import Engine

    if not 0 < held_out < 1:
        raise ValueError(f"held_out must be in (0, 1), got {held_out}")
    with Engine(model, device=device, dtype=dtype, expert_memory=expert_memory, quiet=quiet) as eng:
        cfg = eng.cfg
        window = fit_window(window, 256, cfg.max_position_embeddings)
        if cfg.num_moe_layers < 2:
            raise ValueError("the model has one MoE block: there is no next block to predict")
        ids = eng.tokenizer.encode(text)
        split = int(len(ids) * (1 - held_out))
        if split < 2 * window // 4 or len(ids) - split < 16:
            raise ValueError(
                f"the calibration text has {len(ids)} tokens: too few to train on and hold out "
                f"{held_out:.0%}; give at least {max(64, window)} tokens")
        recorders = {}
        for part, (a, b) in (("train", (0, split)), ("held_out", (split, len(ids)))):
            rec = Recorder(cfg)
            eng.moe.recorder = rec
            for s in range(a, b, window):
                chunk = ids[s:min(b, s + window)]
                if len(chunk) >= 2:
                    eng.logits(chunk)
            eng.moe.recorder = None
            recorders[part] = rec
            log(f"{part}: {b - a} tokens")
        fp = model_fingerprint(eng.model, cfg)
        spec = SpeculativePregate(eng.model, cfg)
        tensors, blocks = {}, []
        log("held-out tokens: each token's predicted experts against its own routed experts "
            "(per-token precision and recall, as in the 'per token' columns of `pregated eval`)")
        for m in range(cfg.num_moe_layers - 1):
            h, probs_next = recorders["train"].h(m), recorders["train"].probs(m + 1)
            norm_w = spec.norms[m + 1].weight
            weight = spec.routers[m + 1].weight
            fitted = fit_block(h, probs_next, norm_w, weight, cfg.rms_norm_eps, steps, lr, seed=m)
            for name, t in zip(("norm", "weight", "bias"), fitted):
                tensors[f"block.{m}.{name}"] = t.contiguous()
            hv, true_next = recorders["held_out"].h(m), recorders["held_out"].ids(m + 1)
            with torch.no_grad():
                spec_ids, _ = route_logits(predictor_logits(hv, norm_w.detach().float().cpu(),
                                                            weight.detach().float().cpu(), None, cfg.rms_norm_eps), cfg)
                trained_ids, _ = route_logits(predictor_logits(hv, *fitted, cfg.rms_norm_eps), cfg)
            sp, sr = overlap(spec_ids, true_next)
            tp, tr = overlap(trained_ids, true_next)
            blocks.append({"block": m, "predicts": m + 1, "tokens": int(hv.shape[0]),
                           "speculative": {"precision": sp, "recall": sr},
                           "trained": {"precision": tp, "recall": tr}})
            log(f"block {m:>3} -> {m + 1:<3} speculative precision {sp:.3f} recall {sr:.3f} | "
                f"trained precision {tp:.3f} recall {tr:.3f}")

        def mean(kind, key):
            return sum(b[kind][key] for b in blocks) / len(blocks)

        report = {
            "format_version": FORMAT_VERSION,
            "model": fp,
            "calibration": {"tokens": len(ids), "train_tokens": split, "held_out_tokens": len(ids) - split,
                            "window": window, "steps": steps, "lr": lr},
            "blocks": blocks,
            "overall": {k: {"precision": mean(k, "precision"), "recall": mean(k, "recall")}
                        for k in ("speculative", "trained")},
        }
    os.makedirs(out, exist_ok=True)
    save_file(tensors, os.path.join(out, FILE), metadata={"format": "pt", "pregated": "pregate"})
    with open(os.path.join(out, "pregate.json"), "w", encoding="utf-8") as f:
        json.dump(report, f, indent=1)
    o = report["overall"]
    log(f"overall   speculative precision {o['speculative']['precision']:.3f} recall {o['speculative']['recall']:.3f} | "
        f"trained precision {o['trained']['precision']:.3f} recall {o['trained']['recall']:.3f}")
    log(f"wrote {out}")
    return report


def fit_window(window: int | None, default: int, context: int) -> int:
    """Tokens per forward pass: `window`, or the smaller of `default` and the model's context."""
    if window is None:
        return min(default, context)
    if not isinstance(window, int) or window < 2:
        raise ValueError(f"window must be an integer >= 2, got {window!r}")
    if window > context:
        raise ValueError(f"window {window} (--window) is longer than the model's context of {context} "
                         f"tokens; use {context} or less")
    return window


def perplexity(engine, ids: list[int], window: int = 512) -> float:
    """exp(mean next-token negative log-likelihood) over non-overlapping windows."""
    nll, count = 0.0, 0
    for s in range(0, len(ids), window):
        chunk = ids[s:s + window]
        if len(chunk) < 2:
            continue
        logits = engine.logits(chunk)
        target = torch.tensor(chunk[1:], device=logits.device)
        nll += float(F.cross_entropy(logits[:-1], target, reduction="sum"))
        count += len(chunk) - 1
    if count == 0:
        raise ValueError("the evaluation text has fewer than 2 tokens")
    return math.exp(nll / count)
