"""README.md's examples run as written, on the demo checkpoint and the CPU: every Python and
shell block is executed; C++ and CMake blocks whose first line names a file (`// main.cc`,
`# CMakeLists.txt`) are written into the shell blocks' folder, so the README's own build
commands compile and run its C++ example. A block preceded by
`<!-- readme-test: skip: REASON -->` is skipped with that reason."""

import os
import re
import shutil
import stat
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")
BLOCK = re.compile(r"(?:<!-- readme-test: skip: (?P<why>.*?) -->\n)?```(?P<lang>[a-z]*)\n(?P<code>.*?)```", re.S)
FILE_NAME = re.compile(r"^(?://|#) ([\w.]+)\n")


def blocks() -> list[dict]:
    with open(README, encoding="utf-8") as f:
        text = f.read()
    out = []
    for m in BLOCK.finditer(text):
        line = text.count("\n", 0, m.start("lang")) + 1
        out.append({"lang": m["lang"], "code": m["code"], "why": m["why"], "line": line})
    return out


def runnable() -> list:
    params = []
    for b in blocks():
        if b["lang"] not in ("python", "bash"):
            continue
        marks = [pytest.mark.skip(reason=f"README.md line {b['line']}: {b['why']}")] if b["why"] else []
        params.append(pytest.param(b, id=f"{b['lang']}-line-{b['line']}", marks=marks))
    return params


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A folder holding the README's named files, and a bin/ whose `python` and `pregated` are
    the interpreter running these tests (so an inactive virtual environment works too)."""
    work = tmp_path_factory.mktemp("readme")
    for b in blocks():
        name = FILE_NAME.match(b["code"])
        if b["lang"] in ("cpp", "cmake") and name:
            (work / name.group(1)).write_text(b["code"], encoding="utf-8")
    bin_dir = work / "bin"
    bin_dir.mkdir()
    os.symlink(sys.executable, bin_dir / "python")
    wrapper = bin_dir / "pregated"
    wrapper.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m pregated "$@"\n')
    wrapper.chmod(wrapper.stat().st_mode | stat.S_IEXEC)
    return work


def test_readme_has_examples_of_each_kind():
    langs = [b["lang"] for b in blocks() if not b["why"]]
    assert langs.count("python") >= 3 and langs.count("bash") >= 2
    names = {FILE_NAME.match(b["code"]).group(1) for b in blocks()
             if b["lang"] in ("cpp", "cmake") and FILE_NAME.match(b["code"])}
    assert names == {"main.cc", "CMakeLists.txt"}


def test_readme_links_resolve_inside_the_repository():
    with open(README, encoding="utf-8") as f:
        text = f.read()
    for target in re.findall(r"\]\(([^)#]+)\)", text):
        if re.match(r"[a-z]+://", target):
            continue
        path = os.path.normpath(os.path.join(ROOT, target))
        assert path.startswith(ROOT + os.sep), f"README.md links outside the repository: {target}"
        assert os.path.exists(path), f"README.md links to {target}, which does not exist"


@pytest.mark.parametrize("block", runnable())
def test_readme_example_runs(block, workdir, tmp_path):
    env = dict(os.environ, PATH=f"{workdir / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}",
               HF_HUB_OFFLINE="1")
    if block["lang"] == "python":
        script = tmp_path / "example.py"
        script.write_text(block["code"], encoding="utf-8")
        cmd, cwd = [sys.executable, str(script)], tmp_path
    else:
        if "cmake" in block["code"] and shutil.which("cmake") is None:
            pytest.skip("cmake is not installed")
        cmd, cwd = ["bash", "-euo", "pipefail", "-c", block["code"]], workdir
    run = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, (f"README.md line {block['line']} failed:\n{block['code']}\n"
                                 f"--- stdout\n{run.stdout[-3000:]}\n--- stderr\n{run.stderr[-3000:]}")
    if "./build/my_app" in block["code"]:
        assert re.search(r"out\[0\]\[0\] = -?\d+\.\d+; \d+ bytes copied, [1-9]\d* experts loaded on demand",
                         run.stdout), run.stdout
