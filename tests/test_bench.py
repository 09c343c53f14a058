"""`pregated bench` on the CPU (smoke run) and a dry run of scripts/gpu-check.sh."""

import importlib.util
import json
import os
import stat
import subprocess
import sys

import pytest

from pregated.bench import FIELDS
from pregated.cli import main
from pregated.suite import DRY_SUITE

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MACHINE = ("gpu", "driver", "cuda", "torch", "cpu", "host_memory_bytes", "h2d_gbps")
HAVE_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None


def check_result(res: dict) -> None:
    for k in MACHINE:
        assert k in res["machine"], k
    assert res["machine"]["h2d_gbps"] > 0
    assert res["runs"]
    for r in res["runs"]:
        for k in FIELDS:
            assert k in r, f"run lacks {k}: {r}"
        assert "error" not in r, r["error"]
        assert r["decode_tokens_per_s"] > 0 and r["prefill_tokens_per_s"] > 0 and r["ttft_s"] > 0
        if r["baseline"]:
            continue
        assert 0 <= r["hit_rate"] <= 1
        assert r["bytes_h2d_per_token"] * r["decode_tokens"] == pytest.approx(r["bytes_h2d_decode"])
        assert r["bytes_h2d_decode"] % (r["expert_bytes_total"] // (r["layers"] * 8)) == 0  # whole experts
        assert 0 < r["efficiency"] <= 1
        if r["policy"] == "gpu-only":
            assert r["bytes_h2d_per_token"] == 0 and r["hit_rate"] == 1  # nothing moves after load
            assert r["expert_memory_bytes"] == r["expert_bytes_total"]
        if r["policy"] == "on-demand":
            assert r["prefetch_issued"] == 0
        if r["policy"] in ("pregated", "hybrid"):  # hybrid prefetches what the pre-gate predicts
            assert 0 <= r["prefetch_precision"] <= 1 and 0 <= r["prefetch_recall"] <= 1
        else:
            assert r["prefetch_precision"] is None
        if r["policy"] != "hybrid":
            assert r["host_bytes_per_token"] == 0
        # the device path is the offloading policies' decode on a GPU only
        assert r["device_forwards"] == 0 and r["store_read_bytes_per_token"] == 0
        assert r["decode_tokens_per_s_without_device_path"] is None


def test_bench_expert_dtypes_side_by_side(tmp_path):
    """--expert-dtype model int4: the same budgets (in % of the model's own expert bytes) for both;
    int4 fits more experts in them and moves fewer bytes per token."""
    out = tmp_path / "q.json"
    assert main(["bench", "--synthetic", "tiny", "--device", "cpu", "--out", str(out), "--new-tokens", "6",
                 "--prompt-len", "8", "--policy", "on-demand", "--expert-memory", "25%", "--expert-dtype",
                 "model", "int4", "--group-size", "32"]) == 0
    res = json.loads(out.read_text())
    check_result(res)
    rows = {(r["expert_dtype"], r["policy"]): r for r in res["runs"]}
    assert set(rows) == {("bfloat16", "gpu-only"), ("bfloat16", "on-demand"), ("int4", "gpu-only"), ("int4", "on-demand")}
    dense, q = rows["bfloat16", "on-demand"], rows["int4", "on-demand"]
    assert q["expert_memory_bytes"] == dense["expert_memory_bytes"] and q["expert_memory_fraction"] == 0.25
    ratio = rows["int4", "gpu-only"]["expert_bytes_total"] / rows["bfloat16", "gpu-only"]["expert_bytes_total"]
    assert ratio == pytest.approx((4 + 32 / 32) / 16, rel=0.05)  # fp16 scale and zero per 32 weights
    assert q["experts_resident"] >= 3 * dense["experts_resident"]
    assert q["bytes_h2d_per_token"] < dense["bytes_h2d_per_token"]


def test_bench_smoke_on_cpu(tmp_path, capsys):
    out = tmp_path / "b.json"
    assert main(["bench", "--synthetic", "tiny", "--device", "cpu", "--out", str(out), "--new-tokens", "6",
                 "--prompt-len", "12", "--batch", "2", "--timeline"]) == 0
    res = json.loads(out.read_text())
    check_result(res)
    labels = {(r["policy"], round(r["expert_memory_fraction"], 2)) for r in res["runs"]}
    assert ("gpu-only", 1.0) in labels and ("pregated", 0.25) in labels and ("on-demand", 0.5) in labels
    events = res["timeline"]["events"]
    assert {e["kind"] for e in events} == {"copy", "compute", "host"}
    summary = res["timeline"]["summary"]
    assert len(summary) == 4 and all(b["host_s"] > 0 and b["compute_s"] > 0 for b in summary)
    # host time per block and per step (the CPU backend computes in the host thread: host >= compute)
    assert 0 < res["timeline"]["block_host_s_median"] < res["timeline"]["step_host_s"]
    assert all(b["host_s"] >= b["compute_s"] for b in summary)
    printed = capsys.readouterr()
    assert "decode t/s" in printed.out and "pregated" in printed.out
    if HAVE_MATPLOTLIB:
        assert os.path.getsize(tmp_path / "b.png") > 1000
    else:  # the plot is optional: the bench says it wrote none
        assert not os.path.exists(tmp_path / "b.png")
        assert "matplotlib is not installed: no plot" in printed.err


def test_bench_hf_baselines_on_cpu(tmp_path):
    out = tmp_path / "b.json"
    assert main(["bench", "--synthetic", "tiny", "--layers", "2", "--device", "cpu", "--out", str(out),
                 "--policy", "pregated", "--expert-memory", "50%", "--new-tokens", "4", "--prompt-len", "8",
                 "--baseline", "hf-accelerate", "--baseline", "hf-gpu", "--save", str(tmp_path / "ckpt"),
                 "--repeat", "3"]) == 0
    res = json.loads(out.read_text())
    check_result(res)
    assert {r["baseline"] for r in res["runs"]} == {None, "hf-accelerate", "hf-gpu"}
    # three rounds of every row, baselines included; each row reports its median decode round
    for r in res["runs"]:
        got = r["decode_tokens_per_s_rounds"]
        assert r["rounds"] == 3 and len(got) == 3 and len(r["prefill_tokens_per_s_rounds"]) == 3
        assert r["decode_tokens_per_s"] == sorted(got)[1]
        assert r["prefill_tokens_per_s"] == r["prefill_tokens_per_s_rounds"][got.index(r["decode_tokens_per_s"])]
    # The saved synthetic checkpoint is a complete model folder.
    assert main(["info", "--model", str(tmp_path / "ckpt")]) == 0


def test_bench_rejects_bad_arguments(tmp_path, capsys):
    assert main(["bench", "--synthetic", "gpt-5", "--device", "cpu", "--out", str(tmp_path / "x.json")]) == 2
    assert "unknown synthetic model 'gpt-5'" in capsys.readouterr().err
    assert main(["bench", "--synthetic", "tiny", "--policy", "fast", "--device", "cpu"]) == 2
    assert "unknown policy 'fast'" in capsys.readouterr().err
    assert main(["bench", "--synthetic", "tiny", "--repeat", "0", "--device", "cpu"]) == 2
    assert "--repeat 0: give at least one round" in capsys.readouterr().err


def test_gpu_check_dry_run(tmp_path):
    """The steps of scripts/gpu-check.sh's suite, on the CPU with tiny shapes, with the
    interpreter that runs these tests (PYTHON), whatever `python3` comes first on PATH."""
    decoy = tmp_path / "bin"
    decoy.mkdir()
    (decoy / "python3").write_text("#!/bin/sh\necho 'the python3 on PATH ran, not $PYTHON' >&2\nexit 3\n")
    (decoy / "python3").chmod(0o755 | stat.S_IEXEC)
    env = dict(os.environ, PYTHON=sys.executable, PATH=f"{decoy}{os.pathsep}{os.environ['PATH']}")
    results = tmp_path / "results"
    run = subprocess.run(["bash", os.path.join(ROOT, "scripts", "gpu-check.sh"), "--dry-run", "--results",
                          str(results)], capture_output=True, text=True, timeout=900, env=env)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    merged = [f for f in os.listdir(results) if f.endswith("-dry-run.json")]
    assert len(merged) == 1
    res = json.loads((results / merged[0]).read_text())
    check_result(res)
    assert not res["failed"] and len(res["commands"]) == len(DRY_SUITE) and res["timelines"]
    assert {r.get("expert_dtype") for r in res["runs"] if not r["baseline"]} >= {"int4"}
    assert os.path.isfile(results / merged[0].replace(".json", ".png")) == HAVE_MATPLOTLIB


def test_suite_entries_split_and_quick():
    """gpu-check.sh's ways to fit a short device lease: --quick, and --only to split the suite
    over calls (each entry keeps its number), with a clear error for a number out of range."""
    from pregated.suite import QUICK_SUITE, SUITE, main as suite_main, suite_entries

    assert suite_entries(False, False, None) == SUITE and suite_entries(False, True, None) == QUICK_SUITE
    picked = suite_entries(False, False, "1, 3")
    assert [e is not None for e in picked] == [k in (1, 3) for k in range(len(SUITE))] and picked[3] == SUITE[3]
    assert suite_entries(True, True, None) == DRY_SUITE[:2]
    assert sum(t for _, _, t in QUICK_SUITE) <= 9 * 60  # inside one 10-minute device call
    for bad in ("9", "x", "", "-1"):
        with pytest.raises(ValueError, match="--only takes entry numbers from 0 to"):
            suite_entries(False, False, bad)
    with pytest.raises(SystemExit):
        suite_main(["--results", "unused", "--only", "9"])


def test_host_read_probe_reads_the_buffer():
    """The bandwidth probe behind `host_read_gbps` (the host lane's bar and hybrid's physical
    limit) returns a positive, finite rate (its value is the bench's to report, not asserted)."""
    import math

    from pregated import _core

    for nbytes in (8 << 20, 32 << 20):
        gbps = _core.cpu_read_gbps(nbytes)
        assert gbps > 0 and math.isfinite(gbps), f"{nbytes} bytes: {gbps}"


def test_read_in_place_tool_runs_every_mode_on_cpu():
    """benchmarks/tools/read_in_place.py (run by gpu-check.sh on a GPU) on tiny shapes."""
    import argparse

    path = os.path.join(ROOT, "benchmarks", "tools", "read_in_place.py")
    spec = importlib.util.spec_from_file_location("read_in_place", path)
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    r = tool.measure(argparse.Namespace(device="cpu", hidden=64, intermediate=32, experts=16, top_k=4,
                                        dtype="float32", blocks=6))
    assert set(r["modes"]) == {"in_place", "planned", "slots"}
    assert all(m["block_s_median"] > 0 for m in r["modes"].values())
    assert r["block_bytes"] == 4 * r["expert_bytes"]
