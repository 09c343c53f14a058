"""The engine on the GPU: a decode step's timeline shows block i+1's copies during block i."""

import json
import os

import pytest
import torch

pytestmark = pytest.mark.gpu


def test_decode_step_copies_overlap_compute():
    from pregated.bench import timeline_summary
    from pregated.engine import Engine
    from pregated.synthetic import SyntheticModel

    model = SyntheticModel("olmoe-1b-7b", layers=6)
    with Engine(model, device="cuda", policy="pregated", expert_memory=None,
                quiet=True) as eng:
        one = eng.cfg.expert_bytes()
        total = one * eng.cfg.num_experts * eng.cfg.num_moe_layers
        eng.reconfigure(policy="pregated", expert_memory=total // 4, eviction="lru")
        prompt = torch.randint(3, eng.cfg.vocab_size, (48,), generator=torch.Generator().manual_seed(0)).tolist()
        events = eng.trace_decode_step(prompt, warmup_tokens=4)
        summary = timeline_summary(events, eng.cfg.num_moe_layers)
        results = os.environ.get("PREGATED_RESULTS_DIR")
        if results:
            with open(os.path.join(results, "engine-decode-step-timeline.json"), "w") as f:
                json.dump({"model": "olmoe-1b-7b (6 layers, synthetic)", "expert_memory_bytes": total // 4,
                           "device": torch.cuda.get_device_name(), "events": events, "summary": summary}, f, indent=1)
        for b in summary:
            print(b)
        copies = [e for e in events if e["kind"] == "copy"]
        assert copies, "a decode step at 25% of the experts moved nothing"
        assert any(b["next_block_copy_during_compute_s"] > 0 for b in summary), \
            "no copy for block i+1 ran while block i's GEMMs ran"
