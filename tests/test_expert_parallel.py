"""Expert parallelism with gloo on the CPU: 2 and 4 processes under torchrun give one process's
greedy tokens and (fp32) logits, under every policy, with uneven expert counts per rank, with
tensor parallelism of attention and dense MLPs on and off; the all-to-all carries the routed rows
the model predicts, and dropping the ranks' duplicate tokens divides them by the rank count; a
rank that dies makes the others fail with a clear error; mismatched ranks are refused at start."""

import os
import subprocess
import sys

import pytest
import torch

from pregated.bench_serve import free_port
from pregated.engine import Engine

HERE = os.path.dirname(os.path.abspath(__file__))
PROMPTS = [[5, 6, 7, 8, 9, 10, 11, 12], [40, 41, 42]]


def torchrun(n: int, args: list[str], timeout: float = 600, env: dict | None = None):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(n), "--master-addr", "127.0.0.1",
           "--master-port", str(free_port()), os.path.join(HERE, "ep_worker.py"), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


def one_process(folder):
    with Engine(folder, device="cpu", quiet=True, policy="gpu-only") as eng:
        eng.eos_ids = set()
        return [r.token_ids for r in eng.generate(PROMPTS, max_new_tokens=8)], eng.logits(PROMPTS[0])


@pytest.mark.parametrize("family,world,over", [
    ("mixtral", 2, {"num_local_experts": 7}),   # 4 + 3 experts per rank
    ("qwen2_moe", 2, {}),                          # shared experts stay replicated
    ("qwen3_moe", 4, {"num_key_value_heads": 4}),  # tensor parallelism splits key/value heads 4 ways
    ("olmoe", 4, {}),                              # q_norm / k_norm across the heads being split
])
def test_ranks_give_one_process_tokens_and_logits(family, world, over, checkpoint_factory, tmp_path):
    folder = checkpoint_factory(family, **over)
    want_tokens, want_logits = one_process(folder)
    policies = ["gpu-only", "on-demand:2", "prefetch-all:4", "pregated:4", "hybrid:1"]
    runs = policies + [p + "+tp" for p in policies] + ["gpu-only+keep"]
    done = torchrun(world, [folder, str(tmp_path), *runs])
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    per_rank = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(world)]
    with Engine(folder, device="cpu", quiet=True) as eng:
        E, K, H, L = eng.cfg.num_experts, eng.cfg.top_k, eng.cfg.hidden_size, eng.cfg.num_moe_layers
    # The model of the traffic: every routed (token, expert) row crosses once out and once back.
    # Routed tokens per MoE block: the prompts (8 + 3, padding skips the experts), 7 decode steps
    # of 2 rows, then logits() over 8 tokens; fp32 rows of H.
    routed = [8 + 3] + [2] * 7 + [8]  # tokens through each MoE block per forward
    predicted = 2 * sum(routed) * L * K * H * 4
    # each rank's slice of the block's output, padded to ceil(T / N) rows, gathered
    gathered = sum(-(-t // world) for t in routed) * L * H * 4
    for run in runs:
        counts = [per_rank[r][run]["local_experts"] for r in range(world)]
        assert sum(counts) == E and max(counts) - min(counts) <= 1, counts
        for r in range(world):
            got = per_rank[r][run]
            assert got["tokens"] == want_tokens, (run, r)
            torch.testing.assert_close(got["logits"], want_logits, rtol=1e-5, atol=1e-5)
            assert got["bytes_sent"] > 0
        sent = sum(per_rank[r][run]["bytes_sent"] for r in range(world))
        if run.endswith("+keep"):  # every rank dispatches every token: N times the rows, no gather
            assert sent == world * predicted and per_rank[0][run]["bytes_gathered"] == 0, run
        else:
            assert sent == predicted, run
            assert all(per_rank[r][run]["bytes_gathered"] == gathered for r in range(world)), run
        if run.endswith("+tp"):  # attention and dense MLPs split: less dense memory, all-reduces
            assert per_rank[0][run]["dense_bytes"] < per_rank[0]["gpu-only"]["dense_bytes"]
            assert per_rank[0][run]["bytes_reduced"] > 0


def test_a_rank_that_dies_fails_the_others_with_a_clear_error(mixtral_folder, tmp_path):
    """Started without torchrun's agent (which would SIGTERM the survivor as soon as it saw the
    death, racing the survivor's own error): rank 0 must fail by itself, with the error."""
    port, procs = free_port(), []
    for rank in range(2):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "EP_TIMEOUT": "20", "RANK": str(rank), "WORLD_SIZE": "2",
               "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        procs.append(subprocess.Popen([sys.executable, os.path.join(HERE, "ep_worker.py"), mixtral_folder,
                                       str(tmp_path), "pregated", "--die-at", "5"], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    try:
        outs = [p.communicate(timeout=300) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert procs[1].returncode == 3  # the rank that died
    assert procs[0].returncode != 0
    assert "expert parallelism: a collective" in outs[0][1] and "of rank 0 failed" in outs[0][1], outs[0][1][-3000:]
    assert not (tmp_path / "rank0.pt").exists()


def test_ranks_with_different_options_are_refused_at_start(mixtral_folder, tmp_path):
    """Rank 1 asks for another budget: both ranks stop at start, naming the rank and the option."""
    script = tmp_path / "mismatch.py"
    script.write_text(
        "import sys, datetime, torch.distributed as dist\n"
        "dist.init_process_group('gloo', timeout=datetime.timedelta(seconds=60))\n"
        "from pregated.engine import Engine\n"
        "try:\n"
        f"    Engine({mixtral_folder!r}, device='cpu', quiet=True, expert_parallel=True,\n"
        "           expert_memory=None if dist.get_rank() == 0 else '200KB')\n"
        "except ValueError as e:\n"
        "    print('REFUSED', e, file=sys.stderr)\n"
        "    sys.exit(7)\n")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(free_port()), str(script)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    assert "rank 1's configuration differs from rank 0's (expert_memory: rank 0 has None, rank 1 has '200KB')" \
        in done.stderr, done.stderr[-3000:]


def test_expert_parallel_needs_a_process_group(mixtral_folder):
    with pytest.raises(RuntimeError, match="needs an initialised torch.distributed process group"):
        Engine(mixtral_folder, device="cpu", quiet=True, expert_parallel=True)


@pytest.mark.parametrize("device,ranks", [("cpu", 2), pytest.param("cuda", None, marks=pytest.mark.gpu)])
def test_generate_under_torchrun_prints_once(mixtral_folder, device, ranks):
    """gloo on the CPU; NCCL on as many GPUs as there are (one GPU: a group of one, which still
    runs every collective through NCCL on device tensors)."""
    if ranks is None:
        ranks = torch.cuda.device_count()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(ranks), "--master-addr",
           "127.0.0.1", "--master-port", str(free_port()), "-m", "pregated", "generate", "--model", mixtral_folder,
           "--prompt", "Experts live in", "--max-new-tokens", "6", "--device", device, "--expert-parallel",
           "--quiet"] + (["--tensor-parallel"] if ranks <= 2 else [])
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    with Engine(mixtral_folder, device=device, quiet=True) as eng:
        want = eng.generate("Experts live in", max_new_tokens=6).text
    assert done.stdout.count(want) == 1  # rank 0 prints, the others stay quiet
    assert f"expert parallel: rank 0 of {ranks} holds {-(-8 // ranks)} of 8 experts per layer" in done.stderr


def test_the_analytical_model_counts_what_the_runtime_sends():
    """The model's all-to-all bytes follow the rule the runtime's traffic obeys (each routed row
    crosses out and back: measured exactly in test_ranks_give_one_process_tokens_and_logits),
    with the share (N - 1) / N that leaves the rank under uniform routing, plus the gather; more
    ranks never lengthen its expert time."""
    from pregated.cli import main
    from pregated.ep_model import SHAPES, MACHINES, step_seconds

    shape, m = SHAPES["mixtral-8x7b"], MACHINES["8xH100-nvlink"]
    for n in (2, 4, 8):
        d = step_seconds(shape, m, n, 16, False)
        rows_out_and_back = 2 * (n - 1) / n * (16 / n) * shape.top_k * shape.hidden * 2
        gather = (n - 1) / n * 16 * shape.hidden * 2
        assert d["all_to_all_bytes_per_rank"] == pytest.approx(shape.moe_layers * (rows_out_and_back + gather))
        assert d["expert_s"] < step_seconds(shape, m, n // 2, 16, False)["expert_s"]
        # without dropping the duplicates every rank sends all 16 tokens' rows and gathers nothing
        keep = step_seconds(shape, m, n, 16, False, drop=False)
        assert keep["all_to_all_bytes_per_rank"] == pytest.approx(
            shape.moe_layers * n * rows_out_and_back)
        # tensor parallelism: a 1 / N share of the dense bytes, plus an all-reduce per layer
        tp = step_seconds(shape, m, n, 16, False, tp=True)
        assert tp["dense_s"] == pytest.approx(d["dense_s"] / n) and tp["all_reduce_bytes_per_rank"] > 0
    assert main(["bench", "--synthetic", "deepseek-v3", "--model-only", "--ranks", "1,8"]) == 0
    assert main(["bench", "--synthetic", "olmoe-1b-7b", "--model-only"]) == 2  # not a shape it knows


class _Ranks:
    """What TensorParallel.shard reads of an ExpertParallel before any collective."""
    world, rank, comm_cpu = 4, 1, True


def test_tensor_parallel_refuses_what_it_cannot_split(mixtral_folder, checkpoint_factory):
    from pregated.modeling import num_layers
    from pregated.tensor_parallel import TensorParallel
    from tiny_models import reference_model

    with pytest.raises(ValueError, match="give expert_parallel=True too"):
        Engine(mixtral_folder, device="cpu", quiet=True, tensor_parallel=True)
    model = reference_model(mixtral_folder)  # 2 key/value heads
    with pytest.raises(ValueError, match="has 2 key/value heads, which do not split over 4 ranks"):
        TensorParallel(_Ranks()).shard(model, num_layers(model))
    mla = reference_model(checkpoint_factory("deepseek_v3"))  # multi-head latent attention
    with pytest.raises(ValueError, match="splits attention layers with q/k/v/o projections: this model has 0"):
        TensorParallel(_Ranks()).shard(mla, num_layers(mla))


def test_bench_under_torchrun(tmp_path):
    """`torchrun -m pregated bench --expert-parallel`: every rank runs the plan, rank 0 writes the
    rows, budgets are per rank (of its half of the experts)."""
    import json

    out = tmp_path / "ep.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(free_port()), "-m", "pregated", "bench", "--synthetic", "tiny", "--layers", "2",
           "--device", "cpu", "--expert-parallel", "--tensor-parallel", "--policy", "pregated", "--expert-memory",
           "50%", "--new-tokens", "4", "--prompt-len", "8", "--quiet", "--out", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    runs = json.loads(out.read_text())["runs"]
    assert [r["policy"] for r in runs] == ["gpu-only", "pregated"] and not any(r.get("error") for r in runs)
    gpu_only, pregated = runs
    assert all(r["ranks"] == 2 and r["tensor_parallel"] for r in runs)
    assert gpu_only["experts_resident"] == 2 * 4  # 2 layers x this rank's 4 of 8 experts
    assert pregated["expert_memory_bytes"] == gpu_only["expert_bytes_total"] // 2
    assert done.stdout.count("pregated ") == 1  # rank 0's table only


def test_bench_refuses_baselines_under_expert_parallel(capsys):
    from pregated.cli import main

    assert main(["bench", "--synthetic", "tiny", "--device", "cpu", "--expert-parallel", "--baseline", "hf"]) == 2
    assert "--baseline runs transformers in one process" in capsys.readouterr().err
    assert main(["bench", "--synthetic", "tiny", "--device", "cpu", "--tensor-parallel"]) == 2
    assert "add --expert-parallel" in capsys.readouterr().err


def test_serve_under_torchrun(mixtral_folder):
    """`torchrun -m pregated serve --expert-parallel`: rank 0 serves and batches; requests that
    join and leave the batch at different steps give Engine.generate's greedy text; the ranks
    stop together."""
    import signal
    from concurrent.futures import ThreadPoolExecutor

    pytest.importorskip("fastapi")
    import httpx

    from pregated.bench_serve import wait_healthy

    port = free_port()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(free_port()), "-m", "pregated", "serve", "--model", mixtral_folder, "--port", str(port),
           "--device", "cpu", "--expert-parallel", "--max-batch", "3", "--prefill-chunk", "4", "--quiet"]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    url = f"http://127.0.0.1:{port}"
    asks = [("Experts live in", 9), ("The quick brown fox jumps over the lazy dog", 4), ("Mixture", 12),
            ("def main():", 6)]
    try:
        wait_healthy(url, proc, timeout=300)
        name = httpx.get(url + "/v1/models", timeout=30).json()["data"][0]["id"]

        def ask(a):
            r = httpx.post(url + "/v1/completions", timeout=120,
                           json={"model": name, "prompt": a[0], "max_tokens": a[1], "temperature": 0})
            assert r.status_code == 200, r.text
            return r.json()["choices"][0]["text"]

        with ThreadPoolExecutor(4) as pool:
            got = list(pool.map(ask, asks))
        proc.send_signal(signal.SIGTERM)  # torchrun passes it on; rank 0 drains and stops rank 1
        proc.wait(120)
    finally:
        if proc.poll() is None:
            proc.kill()
    with Engine(mixtral_folder, device="cpu", quiet=True) as eng:
        want = [eng.generate(p, max_new_tokens=n).text for p, n in asks]
    assert got == want
