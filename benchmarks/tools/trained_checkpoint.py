"""A small Mixtral-style checkpoint *trained* on this repository's text, for measuring what
quantized experts cost in quality (random weights say little: their next-token distributions are
nearly flat or arbitrarily peaked).

python benchmarks/tools/trained_checkpoint.py --out /tmp/trained [--steps 300]
pregated eval --model /tmp/trained --data /tmp/trained/held-out.txt --expert-dtype int8 int4 int3 int2

The demo's shapes (4 layers, 8 experts of H=256, I=512, top-2), a byte-pair tokenizer of 2048
tokens, trained with AdamW on the repository's Markdown and Python files (90%), the other 10%
written to held-out.txt. A few minutes on 2 CPU cores.
"""

import argparse
import glob
import math
import os
import time

import torch

from pregated.demo import DEMO_CONFIG, train_tokenizer
from pregated.tokenizer import Tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def repository_text() -> str:
    files = sorted(glob.glob(os.path.join(ROOT, "**", "*.md"), recursive=True)
                   + glob.glob(os.path.join(ROOT, "python", "**", "*.py"), recursive=True)
                   + glob.glob(os.path.join(ROOT, "tests", "*.py")))
    files = [f for f in files if "/build/" not in f and "/." not in f[len(ROOT):]]
    return "\n\n".join(open(f, encoding="utf-8").read() for f in files)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--lr", type=float, default=3e-3)
    args = ap.parse_args()
    from transformers import MixtralConfig, MixtralForCausalLM

    os.makedirs(args.out, exist_ok=True)
    text = repository_text()
    cut = int(0.9 * len(text))
    train_text, held_out = text[:cut], text[cut:]
    with open(os.path.join(args.out, "held-out.txt"), "w", encoding="utf-8") as f:
        f.write(held_out)
    vocab = train_tokenizer(args.out, 2048, [train_text[i:i + 4096] for i in range(0, len(train_text), 4096)])
    ids = torch.tensor(Tokenizer(args.out).encode(train_text), dtype=torch.long)
    print(f"{len(text)} characters, {len(ids)} training tokens, vocabulary {vocab}")
    cfg = {k: v for k, v in DEMO_CONFIG.items() if k not in ("architectures", "model_type", "torch_dtype")}
    torch.manual_seed(0)
    model = MixtralForCausalLM(MixtralConfig(**cfg, vocab_size=vocab, router_aux_loss_coef=0.01,
                                             output_router_logits=True))
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, s / 20) * 0.5 * (1 + math.cos(math.pi * s / args.steps)))
    g = torch.Generator().manual_seed(0)
    t0 = time.perf_counter()
    for step in range(args.steps):
        starts = torch.randint(0, len(ids) - args.seq - 1, (args.batch,), generator=g)
        batch = torch.stack([ids[s:s + args.seq] for s in starts])
        loss = model(input_ids=batch, labels=batch).loss  # includes the router's balance loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 25 == 0 or step == args.steps - 1:
            print(f"step {step:4d}  loss {loss.item():.3f}  {time.perf_counter() - t0:.0f} s", flush=True)
    model.config.output_router_logits = False
    model.to(torch.bfloat16).save_pretrained(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
