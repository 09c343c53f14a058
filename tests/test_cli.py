"""The pregated command line."""

import os
import subprocess
import sys

import pytest

from pregated.cli import main


def pregated_command():
    """The installed console script (next to this Python's executables)."""
    import sysconfig

    path = os.path.join(sysconfig.get_path("scripts"), "pregated")
    assert os.path.isfile(path), f"the pregated command is not installed at {path}"
    return path


def test_help_is_useful(capsys):
    out = subprocess.run([pregated_command(), "--help"], capture_output=True, text=True, check=True).stdout
    for cmd in ("demo", "generate", "info"):
        assert cmd in out
    for cmd, needles in (("generate", ["--model", "--prompt", "--chat", "--max-new-tokens", "--temperature",
                                       "--top-p", "--top-k", "--seed", "--device", "--policy", "--expert-memory"]),
                         ("info", ["--model", "--expert-memory"]),
                         ("demo", ["--prompt", "--device", "--expert-memory"])):
        with pytest.raises(SystemExit) as e:
            main([cmd, "--help"])
        assert e.value.code == 0
        text = capsys.readouterr().out
        for n in needles:
            assert n in text, f"{cmd} --help lacks {n}"


def test_info(mixtral_folder, capsys):
    assert main(["info", "--model", mixtral_folder, "--expert-memory", "100KB"]) == 0
    out = capsys.readouterr().out
    assert "3 decoder layers, 3 with MoE" in out
    assert "8 per MoE layer, 2 per token" in out
    assert "of 24 experts" in out and "minimum" in out
    assert "hybrid" in out and "slots for hot experts" in out


def test_generate_with_the_hybrid_policy(mixtral_folder, capsys):
    rc = main(["generate", "--model", mixtral_folder, "--prompt", "Experts live in", "--max-new-tokens", "6",
               "--device", "cpu", "--policy", "hybrid", "--expert-memory", "100KB", "--lane-plan", "host",
               "--per-block"])
    assert rc == 0
    err = capsys.readouterr().err
    assert "policy hybrid" in err and "experts computed on the host" in err and "host ms" in err


def test_generate_streams_and_reports(mixtral_folder, capsys):
    rc = main(["generate", "--model", mixtral_folder, "--prompt", "Experts live in", "--max-new-tokens", "6",
               "--device", "cpu", "--policy", "pregated", "--expert-memory", "20KB"])
    assert rc == 2  # below the minimum: a clear error, not a crash
    assert "below the minimum for policy 'pregated'" in capsys.readouterr().err
    from pregated.engine import Engine
    with Engine(mixtral_folder, device="cpu", quiet=True) as eng:
        budget = 5 * eng.cfg.expert_bytes()
        expected = eng.generate("Experts live in", max_new_tokens=6).text
    rc = main(["generate", "--model", mixtral_folder, "--prompt", "Experts live in", "--max-new-tokens", "6",
               "--device", "cpu", "--expert-memory", str(budget)])
    assert rc == 0
    cap = capsys.readouterr()
    assert cap.out.strip() == expected.strip()
    assert "tokens/s" in cap.err and "moved" in cap.err and "pre-gate precision" in cap.err


def test_generate_chat(mixtral_folder, capsys):
    assert main(["generate", "--model", mixtral_folder, "--prompt", "hi", "--chat", "--max-new-tokens", "3",
                 "--device", "cpu"]) == 0
    assert "policy gpu-only" in capsys.readouterr().err


def test_demo_runs_offline(tmp_path):
    env = dict(os.environ, PREGATED_CACHE=str(tmp_path), HF_HUB_OFFLINE="1")
    run = subprocess.run([pregated_command(), "demo", "--device", "cpu", "--max-new-tokens", "8"],
                         capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "policy pregated" in run.stderr and "moved" in run.stderr and "6 of 32 experts fit" in run.stderr
    assert os.path.isfile(tmp_path / "demo-mixtral-v2" / "model.safetensors.index.json")
