"""What a new user meets first: the public API as users import it, token ids in every form,
clear errors (the same from the API and the CLI), quiet logs, and benchmarks that refuse what
the machine cannot hold."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import pregated
from pregated.cli import main


def test_public_api_imports_as_users_write_it():
    code = ("from pregated import Engine, Runtime, GenerationResult, SamplingParams, TextStream, "
            "SyntheticModel, build_info, get_cmake_dir, demo_model\n"
            "import pregated\n"
            "assert all(getattr(pregated, n) is not None for n in pregated.__all__)\n"
            "print(Engine.__module__, Runtime.__name__)")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == ["pregated.engine", "Runtime"]
    with pytest.raises(AttributeError, match="has no attribute 'Engin'"):
        pregated.Engin  # noqa: B018


@pytest.fixture(scope="module")
def engine(mixtral_folder):
    with pregated.Engine(mixtral_folder, device="cpu", quiet=True) as eng:
        yield eng


def test_token_ids_as_lists_tensors_and_arrays(engine):
    ids = [5, 6, 7, 8]
    want = engine.logits(ids)
    for form in (torch.tensor(ids), torch.tensor(ids, dtype=torch.int32), np.array(ids),
                 np.array(ids, dtype=np.int16), tuple(ids), [np.int64(i) for i in ids]):
        assert torch.equal(engine.logits(form), want), type(form)
    greedy = engine.generate(ids, max_new_tokens=4).token_ids
    assert engine.generate(torch.tensor(ids), max_new_tokens=4).token_ids == greedy
    assert engine.generate(np.array(ids), max_new_tokens=4).token_ids == greedy
    batch = engine.generate([torch.tensor(ids), np.array(ids)], max_new_tokens=4)
    assert [r.token_ids for r in batch] == [greedy, greedy]


def test_token_ids_refused_with_the_type_given(engine):
    with pytest.raises(TypeError, match=r"1-D integer tensor or array, got a 1-D float32 tensor of shape \[3\]"):
        engine.logits(torch.tensor([1.0, 2.0, 3.0]))
    with pytest.raises(TypeError, match=r"got a 2-D int64 tensor of shape \[2, 2\]; for a batch give a list of prompts"):
        engine.logits(torch.tensor([[1, 2], [3, 4]]))
    with pytest.raises(TypeError, match=r"got a 1-D float64 numpy array"):
        engine.generate(np.array([1.0, 2.0]))
    with pytest.raises(TypeError, match=r"token ids must be integers, got 2.5 \(float\)"):
        engine.logits([1, 2.5])
    with pytest.raises(TypeError, match=r"got 'hello' \(str\)"):
        engine.logits("hello")
    with pytest.raises(ValueError, match=r"token id 100000 is not in the vocabulary"):
        engine.logits(torch.tensor([1, 100000]))


def test_chat_messages_are_checked(engine):
    with pytest.raises(ValueError, match=r"chat message 1 has no 'content'"):
        engine.generate([{"role": "user", "content": "hi"}, {"role": "assistant"}])
    with pytest.raises(ValueError, match=r"chat message 0 has no 'role'"):
        engine.generate([{"content": "hi"}])
    with pytest.raises(ValueError, match=r"chat message 0 has no 'content'"):
        engine.apply_chat_template([{"role": "user", "content": None}])


def test_empty_stop_string_is_refused_by_api_and_cli(engine, mixtral_folder, capsys):
    message = "stop must be a string or a list of non-empty strings"
    with pytest.raises(ValueError, match=message):
        engine.generate("hello", stop="")
    assert main(["generate", "--model", mixtral_folder, "--prompt", "hi", "--stop", "", "--device", "cpu",
                 "--quiet"]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("value", ["-5GiB", -1, "-1"])
def test_negative_expert_memory_is_one_clear_error(value, mixtral_folder, capsys):
    message = "expert_memory must be a byte count >= 0"
    with pytest.raises(ValueError, match=message):
        pregated.Engine(mixtral_folder, device="cpu", expert_memory=value, quiet=True)
    assert main(["generate", "--model", mixtral_folder, "--prompt", "hi", "--expert-memory", str(value),
                 "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert message in err and "expected one argument" not in err
    assert main(["info", "--model", mixtral_folder, "--expert-memory", str(value)]) == 2
    assert message in capsys.readouterr().err


def test_unknown_device_names_the_choices(mixtral_folder, capsys):
    message = "device 'gpu' is not supported: use 'cpu', 'cuda' or 'cuda:N'"
    with pytest.raises(ValueError, match=message):
        pregated.Engine(mixtral_folder, device="gpu", quiet=True)
    assert main(["generate", "--model", mixtral_folder, "--prompt", "hi", "--device", "gpu"]) == 2
    err = capsys.readouterr().err
    assert message in err and "mps" not in err  # not torch's list of every device type


def test_eval_data_that_exists_but_holds_no_text(mixtral_folder, tmp_path, capsys):
    assert main(["eval", "--model", mixtral_folder, "--data", "/dev/null", "--device", "cpu"]) == 2
    assert "data file /dev/null holds no text" in capsys.readouterr().err
    assert main(["eval", "--model", mixtral_folder, "--data", str(tmp_path), "--device", "cpu"]) == 2
    assert "is a folder" in capsys.readouterr().err
    assert main(["eval", "--model", mixtral_folder, "--data", str(tmp_path / "no.txt"), "--device", "cpu"]) == 2
    assert "does not exist" in capsys.readouterr().err


TEXT = " ".join(["Mixture of experts models route each token to a few experts.",
                 "Experts live in host memory and move to the GPU before they are needed."] * 20)


def test_eval_window_fits_a_short_context(checkpoint_factory, tmp_path, capsys):
    folder = checkpoint_factory("mixtral", max_position_embeddings=48)
    data = tmp_path / "t.txt"
    data.write_text(TEXT)
    assert main(["eval", "--model", folder, "--data", str(data), "--device", "cpu", "--json",
                 str(tmp_path / "e.json")]) == 0
    assert json.loads((tmp_path / "e.json").read_text())["window"] == 48
    assert main(["eval", "--model", folder, "--data", str(data), "--device", "cpu", "--window", "64"]) == 2
    assert "window 64 (--window) is longer than the model's context of 48 tokens" in capsys.readouterr().err


def test_eval_and_calibrate_report_the_same_per_token_precision(mixtral_folder):
    """eval's per-token pre-gate precision is calibrate's measure: recomputed here the way
    calibrate computes it (recorded residual streams, the speculative predictor, token overlap)."""
    from pregated.cli_tools import evaluate
    from pregated.pregate import Recorder, SpeculativePregate, overlap, route_with

    window = 64
    res = evaluate(mixtral_folder, TEXT, window=window, device="cpu")
    exact = res["results"][0]
    assert exact["routing"] == "exact" and exact["pregate"] == "speculative"
    with pregated.Engine(mixtral_folder, device="cpu", quiet=True) as eng:
        ids = eng.tokenizer.encode(TEXT)
        rec = Recorder(eng.cfg)
        eng.moe.recorder = rec
        eng.taps.record_router_logits(True)
        for s in range(0, len(ids), window):
            if len(ids[s:s + window]) >= 2:
                eng.logits(ids[s:s + window])
        spec = SpeculativePregate(eng.blocks, eng.taps)
        hits = count = 0
        with torch.no_grad():
            for m in range(eng.cfg.num_moe_layers - 1):
                _, pred, _ = route_with(*spec.modules(m), rec.h(m))
                p, _ = overlap(pred, rec.ids(m + 1))
                hits += p * pred.shape[0]
                count += pred.shape[0]
    assert exact["pregate_precision"] == pytest.approx(hits / count, abs=1e-6)  # overlap() averages in float32
    # per block call, nearly every expert is both predicted and routed: a different measure
    assert exact["prefetch_precision"] > exact["pregate_precision"]


def test_progress_bar_only_on_a_terminal(mixtral_folder, capsys):
    pregated.Engine(mixtral_folder, device="cpu").close()  # stderr captured: not a terminal
    assert "loading" not in capsys.readouterr().err
    import fcntl
    import pty
    import struct
    import termios

    outputs = {}
    for quiet in (False, True):
        master, slave = pty.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # a 100-column terminal
        cmd = [sys.executable, "-c", "import sys; from pregated.cli import main; sys.exit(main(sys.argv[1:]))",
               "generate", "--model", mixtral_folder, "--prompt", "hi", "--max-new-tokens", "2", "--device", "cpu"]
        if quiet:
            cmd.append("--quiet")
        run = subprocess.run(cmd, stderr=slave, stdout=subprocess.PIPE, timeout=300)
        os.close(slave)
        chunks = []
        while True:
            try:
                chunk = os.read(master, 65536)
            except OSError:
                break
            if not chunk:
                break
            chunks.append(chunk)
        os.close(master)
        assert run.returncode == 0
        outputs[quiet] = b"".join(chunks).decode(errors="replace")
    assert "loading" in outputs[False]
    assert "loading" not in outputs[True] and "tokens/s" in outputs[True]


# --- pregated bench ---------------------------------------------------------------------------

def test_bench_refuses_what_the_machine_cannot_hold(monkeypatch, capsys):
    """Before allocating anything: what the run needs, what the machine has, what to pass."""
    import re

    from pregated import engine, footprint

    monkeypatch.setattr(footprint, "available_host_bytes", lambda: 16 << 30)

    def no_engine(*a, **k):
        raise AssertionError("an Engine was created before the memory check")

    monkeypatch.setattr(engine.Engine, "__init__", no_engine)
    assert main(["bench", "--synthetic", "mixtral-8x7b", "--layers", "8", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert re.search(r"needs about [\d.]+ GiB of host memory \(expert store 21\.00 GiB, dense weights", err), err
    assert "this machine has 16.00 GiB available" in err
    layers = int(re.search(r"pass --layers (\d+) or fewer", err).group(1))
    # the advice is right: that many layers fit, one more does not
    from pregated.bench import _fits
    from pregated.synthetic import SyntheticModel

    def fits(n):
        cfg = SyntheticModel("mixtral-8x7b", layers=n).config
        return _fits(footprint.bench_footprint(cfg, "cpu", cfg.all_expert_bytes() // 2, []), "cpu")

    assert fits(layers) and not fits(layers + 1)


def test_bench_baseline_without_transformers_says_what_to_install(tmp_path):
    code = ("import sys; sys.modules['transformers'] = None\n"
            "from pregated.cli import main\n"
            "sys.exit(main(['bench', '--synthetic', 'tiny', '--device', 'cpu', '--baseline', 'hf-accelerate', "
            f"'--out', {str(tmp_path / 'b.json')!r}]))")
    env = dict(os.environ, TMPDIR=str(tmp_path))
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 2, run.stderr
    assert "needs transformers, which is not installed: pip install transformers" in run.stderr
    assert "Traceback" not in run.stderr
    assert not [f for f in os.listdir(tmp_path) if f.startswith("pregated-bench-")]


def test_bench_removes_its_temporary_checkpoint_on_every_exit(tmp_path, monkeypatch):
    import tempfile

    from pregated import bench

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(bench, "run_hf", interrupted)
    assert main(["bench", "--synthetic", "tiny", "--layers", "2", "--device", "cpu", "--policy", "pregated",
                 "--expert-memory", "50%", "--no-gpu-only", "--new-tokens", "3", "--prompt-len", "4",
                 "--baseline", "hf-gpu", "--out", str(tmp_path / "b.json")]) == 130
    assert not [f for f in os.listdir(tmp_path) if f.startswith("pregated-bench-")]


def test_bench_table_shows_the_budget_used(tmp_path, capsys):
    out = tmp_path / "b.json"
    assert main(["bench", "--synthetic", "tiny", "--layers", "2", "--device", "cpu", "--policy", "pregated",
                 "--expert-memory", "1%,50%", "--no-gpu-only", "--new-tokens", "3", "--prompt-len", "4",
                 "--out", str(out)]) == 0
    runs = json.loads(out.read_text())["runs"]
    raised, plain = runs
    assert raised["expert_memory_requested"] < raised["expert_memory_bytes"]
    assert raised["expert_memory_fraction"] == raised["expert_memory_bytes"] / raised["expert_bytes_total"]
    assert "expert_memory_requested" not in plain
    table = capsys.readouterr().out
    row = next(line for line in table.splitlines() if line.startswith("tiny") and "*" in line)
    assert f"{100 * raised['expert_memory_fraction']:.0f}*" in row  # 25% (4 of 16 experts), not 1%
    assert "* budget raised to the policy's minimum (asked: 1% of the expert bytes)" in table
