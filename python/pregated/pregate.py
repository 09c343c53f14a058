"""Pre-gates: predictors of block m+1's experts from block m's residual stream.

speculative  block m+1's own norm and router (transformers' modules, whatever the family's
             routing: softmax or sigmoid scores, correction biases, group-limited top-k,
             routed_scaling_factor) applied to block m's residual stream; needs only the
             checkpoint (Eliseev & Mazur's speculative loading)
trained      the same modules with their parameters fitted on calibration text to block m+1's
             router logits, starting from the speculative ones (`pregated calibrate`)

T = tokens, H = hidden, E = experts per layer, K = experts per token, N = calibration tokens.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch.func import functional_call

from .moe import token_hits

FORMAT_VERSION = 2
FILE = "pregate.safetensors"


class PregateError(ValueError):
    """A pre-gate folder is missing, unreadable or does not match the model."""


def route_with(norm, router, extra: list, rank: int, read, h: torch.Tensor, params: dict | None = None):
    """router(norm(h), *extra) -> (logits [T, E], ids [T, K], weights [T, K]), with `params`
    ("norm.<name>", "router.<name>") in place of the modules' own where given. h: [T, H],
    given to the router as [1, T, H] where the family's block gives it a 3-D input (rank 3)."""
    params = params or {}
    if rank == 3:
        h = h[None]
    if norm is not None:
        own = {k[5:]: v for k, v in params.items() if k.startswith("norm.")}
        h = functional_call(norm, own, (h,)) if own else norm(h)
    own = {k[7:]: v for k, v in params.items() if k.startswith("router.")}
    out = functional_call(router, own, (h, *extra)) if own else router(h, *extra)
    if read is not None:  # a family whose router answers in another order (SwitchTransformers)
        return read(out)
    flat = [t.reshape(-1, t.shape[-1]) for t in out[:3]]
    return flat[0], flat[2], flat[1]


class SpeculativePregate:
    """Block m+1's own norm and router on block m's residual stream."""
    kind = "speculative"

    def __init__(self, blocks, taps):
        self.blocks = blocks
        self.taps = taps

    def modules(self, m: int):
        """(norm, router, extra router arguments, router input rank, output reader) that
        predict block m + 1."""
        b = self.blocks[m + 1]
        return (self.taps.norm(m + 1), b.router, [getattr(b.block, a) for a in b.router_args],
                self.taps.router_rank[m + 1], b.read_router)

    def params(self, m: int) -> dict | None:
        return None

    def predict(self, m: int, h: torch.Tensor):
        """h: [T, H] residual stream at block m -> (ids, weights) [T, K] for block m + 1."""
        _, ids, weights = route_with(*self.modules(m), h, self.params(m))
        return ids, weights


class TrainedPregate(SpeculativePregate):
    """The speculative pre-gate's modules with fitted parameters per block."""
    kind = "trained"

    def __init__(self, blocks, taps, fitted: list[dict[str, torch.Tensor]]):
        super().__init__(blocks, taps)
        self.fitted = fitted

    def params(self, m: int) -> dict:
        return self.fitted[m]


def trainable(norm, router) -> dict[str, torch.Tensor]:
    """The parameters a trained pre-gate fits: "norm.<name>" and "router.<name>"."""
    out = {f"router.{k}": v for k, v in router.named_parameters()}
    if norm is not None:
        out.update({f"norm.{k}": v for k, v in norm.named_parameters()})
    return out


# --- matching a pre-gate to its model ---------------------------------------------------

def model_fingerprint(blocks, cfg) -> dict:
    """What a pre-gate must agree with: the architecture and the routers' weights."""
    digest = hashlib.sha256()
    for b in blocks:
        for _, p in sorted(b.router.named_parameters()):
            digest.update(p.detach().float().cpu().numpy().tobytes())
    return {"model_type": cfg.model_type, "num_moe_layers": cfg.num_moe_layers, "num_experts": cfg.num_experts,
            "hidden_size": cfg.hidden_size, "top_k": cfg.top_k, "routers_sha256": digest.hexdigest()}


def load_pregate(folder: str, blocks, taps, cfg, device) -> TrainedPregate:
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
        raise PregateError(f"{meta_path}: format version {meta.get('format_version')} is not {FORMAT_VERSION}; "
                           "calibrate again")
    want = model_fingerprint(blocks, cfg)
    for key, value in want.items():
        got = meta.get("model", {}).get(key)
        if got != value:
            what = "router weights" if key == "routers_sha256" else f"{key} {got}"
            raise PregateError(
                f"pre-gate {folder} does not match this model: it was calibrated for {what}"
                + ("" if key == "routers_sha256" else f", this model has {value}")
                + " (a different checkpoint); calibrate it for this model")
    spec = SpeculativePregate(blocks, taps)
    fitted = []
    for m in range(cfg.num_moe_layers - 1):
        norm, router = spec.modules(m)[:2]
        block = {}
        for name, p in trainable(norm, router).items():
            t = tensors.get(f"block.{m}.{name}")
            if t is None or tuple(t.shape) != tuple(p.shape):
                raise PregateError(f"{path}: tensor block.{m}.{name} is missing or not of shape "
                                   f"{list(p.shape)}; calibrate again")
            block[name] = t.to(device=p.device, dtype=p.dtype)
        fitted.append(block)
    return TrainedPregate(blocks, taps, fitted)


# --- calibration --------------------------------------------------------------------------

@dataclass
class BlockData:
    h: list        # [n, H] float32 chunks: block m's residual stream
    logits: list   # [n, E] float32 chunks: block m's own router logits
    ids: list      # [n, K] chunks: block m's routed experts


class Recorder:
    """Collects, per MoE block, the residual stream and the true routing (a MoEExecutor hook)."""

    def __init__(self, cfg):
        self.cfg = cfg
        self.blocks = [BlockData([], [], []) for _ in range(cfg.num_moe_layers)]

    def __call__(self, m: int, h: torch.Tensor, router_logits: torch.Tensor, ids: torch.Tensor) -> None:
        b = self.blocks[m]
        b.h.append(h.detach().float().cpu())
        b.logits.append(router_logits.detach().float().cpu())
        b.ids.append(ids.detach().cpu())

    def h(self, m: int) -> torch.Tensor:
        return torch.cat(self.blocks[m].h)

    def logits(self, m: int) -> torch.Tensor:
        return torch.cat(self.blocks[m].logits)

    def ids(self, m: int) -> torch.Tensor:
        return torch.cat(self.blocks[m].ids)


def overlap(pred_ids: torch.Tensor, true_ids: torch.Tensor) -> tuple[float, float]:
    """Per-token precision and recall of predicted expert sets, averaged: [N, K'] vs [N, K]."""
    hit = token_hits(pred_ids, true_ids).float()  # [N]
    return float((hit / pred_ids.shape[1]).mean()), float((hit / true_ids.shape[1]).mean())


def _cpu_float(norm, router, extra, rank, read):
    """float32 CPU copies of the modules that predict a block (calibration runs on the CPU)."""
    copy_of = (lambda mod: None if mod is None else copy.deepcopy(mod).to("cpu", torch.float32))
    return copy_of(norm), copy_of(router), [a.detach().to("cpu", torch.float32) if torch.is_tensor(a) else a
                                            for a in extra], rank, read


def fit_block(modules, h, logits_next, steps: int, lr: float, seed: int = 0) -> dict[str, torch.Tensor]:
    """Fits the norm's and the router's parameters so that block m+1's router distribution on
    block m's stream matches the true one (KL divergence of the softmax over router logits,
    plus the mean logit, which the softmax ignores and sigmoid routers do not), starting from
    the speculative pre-gate. The last tenth of the training tokens picks between the fitted
    and the starting parameters."""
    norm, router, extra, rank, read = modules
    n = h.shape[0]
    n_val = max(1, n // 10)
    val = slice(n - n_val, n)  # training draws from [0, n - n_val)
    start = {k: v.detach().clone() for k, v in trainable(norm, router).items()}
    params = {k: v.clone().requires_grad_(True) for k, v in start.items()}
    opt = torch.optim.Adam(list(params.values()), lr=lr)
    g = torch.Generator().manual_seed(seed)
    batch = min(4096, n - n_val)
    true_probs = torch.softmax(logits_next, -1)

    def loss_on(sl, ps):
        pred, _, _ = route_with(norm, router, extra, rank, read, h[sl], ps)
        kl = -(true_probs[sl] * torch.log_softmax(pred, -1)).sum(-1).mean()
        return kl + (pred.mean(-1) - logits_next[sl].mean(-1)).pow(2).mean()

    with torch.enable_grad():
        for _ in range(steps):
            loss = loss_on(torch.randint(0, n - n_val, (batch,), generator=g), params)
            opt.zero_grad()
            loss.backward()
            opt.step()
    with torch.no_grad():
        fitted = {k: v.detach() for k, v in params.items()}
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
        eng.taps.record_router_logits(True)
        try:
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
        finally:
            eng.moe.recorder = None
            eng.taps.record_router_logits(False)
        fp = model_fingerprint(eng.blocks, cfg)
        spec = SpeculativePregate(eng.blocks, eng.taps)
        tensors, blocks = {}, []
        log("held-out tokens: each token's predicted experts against its own routed experts "
            "(per-token precision and recall, as in the 'per token' columns of `pregated eval`)")
        for m in range(cfg.num_moe_layers - 1):
            modules = _cpu_float(*spec.modules(m))
            fitted = fit_block(modules, recorders["train"].h(m), recorders["train"].logits(m + 1), steps, lr, seed=m)
            for name, t in fitted.items():
                tensors[f"block.{m}.{name}"] = t.contiguous()
            hv, true_next = recorders["held_out"].h(m), recorders["held_out"].ids(m + 1)
            with torch.no_grad():
                _, spec_ids, _ = route_with(*modules, hv)
                _, trained_ids, _ = route_with(*modules, hv, fitted)
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
