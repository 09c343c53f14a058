"""One rank of the expert-parallel tests, run by torchrun (tests/test_expert_parallel.py):

    torchrun --nproc-per-node N tests/ep_worker.py FOLDER OUT_DIR POLICY[:EXPERTS][+tp][+keep] ... [--die-at STEP]

For each policy (EXPERTS: the budget in experts per rank, else everything; +tp: tensor parallelism
of attention and dense MLPs too; +keep: no dropping of duplicate tokens before the all-to-all),
builds an Engine with expert_parallel=True on the gloo group, generates greedily and takes the
logits of a prompt;
rank r writes OUT_DIR/rank{r}.pt. --die-at makes rank 1 exit in the middle of a generate.
"""

import datetime
import os
import sys

import torch
import torch.distributed as dist

PROMPTS = [[5, 6, 7, 8, 9, 10, 11, 12], [40, 41, 42]]


def main(argv):
    die_at = None
    if "--die-at" in argv:
        i = argv.index("--die-at")
        die_at, argv = int(argv[i + 1]), argv[:i] + argv[i + 2:]
    folder, out_dir, runs = argv[0], argv[1], argv[2:]
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=float(os.environ.get("EP_TIMEOUT", "60"))))
    rank = dist.get_rank()
    from pregated.engine import Engine

    from pregated.modeling import summarize

    one = summarize(folder)[1].expert_bytes()  # every rank's experts have the model's shape
    results = {}
    for run in runs:
        spec, *flags = run.split("+")
        policy, _, experts = spec.partition(":")
        kw = {"policy": policy, "tensor_parallel": "tp" in flags}
        if experts:
            kw["expert_memory"] = int(experts) * one
        with Engine(folder, device="cpu", quiet=True, expert_parallel=True, **kw) as eng:
            eng.eos_ids = set()
            eng.ep.drop_duplicates = "keep" not in flags
            if die_at is not None and rank == 1:
                calls = [0]
                inner = eng.moe._block

                def dying(*a):
                    calls[0] += 1
                    if calls[0] == die_at:
                        os._exit(3)  # a rank that dies mid-generate
                    return inner(*a)

                eng.moe._block = dying
            tokens = [r.token_ids for r in eng.generate(PROMPTS, max_new_tokens=8)]
            logits = eng.logits(PROMPTS[0])
            eng.runtime.check()
            results[run] = {"tokens": tokens, "logits": logits, "bytes_sent": eng.ep.bytes_sent,
                            "bytes_gathered": eng.ep.bytes_gathered,
                            "bytes_reduced": eng.tp.bytes_reduced if eng.tp else 0,
                            "dense_bytes": eng.dense_bytes,
                            "local_experts": eng.rank_cfg.num_experts, "stats": eng.stats()}
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
