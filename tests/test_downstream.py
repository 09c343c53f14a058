"""A downstream CMake project finds the installed package, links pregated::core and runs."""

import os
import shutil
import subprocess

import pytest

import pregated

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake is not installed")
def test_downstream_project_builds_and_runs(tmp_path):
    build = tmp_path / "build"
    cmd = ["cmake", "-S", os.path.join(HERE, "downstream"), "-B", str(build),
           f"-Dpregated_DIR={pregated.get_cmake_dir()}", "-DCMAKE_BUILD_TYPE=Release"]
    if shutil.which("ninja"):
        cmd += ["-G", "Ninja"]
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    subprocess.run(["cmake", "--build", str(build)], check=True, capture_output=True, text=True)
    run = subprocess.run([str(build / "downstream")], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "downstream ok" in run.stdout


def test_build_info_and_cmake_dir():
    info = pregated.build_info()
    assert set(info) >= {"cuda", "cuda_devices", "blas", "version"}
    assert isinstance(info["cuda"], bool) and isinstance(info["cuda_devices"], int)
    assert "OpenBLAS" in info["blas"]
    assert info["version"] == pregated.__version__
    assert os.path.isfile(os.path.join(pregated.get_cmake_dir(), "pregatedConfig.cmake"))
    assert os.path.isfile(os.path.join(pregated.get_include_dir(), "pregated", "pregated.h"))
