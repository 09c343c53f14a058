"""pregated: Mixture-of-Experts inference on one GPU smaller than the model.

Expert weights live in host memory; a pre-gate predicts the experts of the next MoE block and
the runtime copies them to the GPU while the current block computes.
"""

from __future__ import annotations

import os

from . import _core
from ._core import Runtime, expert_bytes, format_bytes, parse_bytes

__version__ = _core.build_info()["version"]

__all__ = [
    "Runtime",
    "build_info",
    "expert_bytes",
    "format_bytes",
    "get_cmake_dir",
    "get_include_dir",
    "parse_bytes",
]


def build_info() -> dict:
    """What this build holds and what it can use now.

    Returns a dict with ``cuda`` (CUDA backend compiled in), ``cuda_devices`` (usable CUDA
    devices right now), ``blas`` (the library behind the CPU backend's GEMMs), ``version`` and
    ``cuda_archs`` (GPU architectures the kernels were built for).
    """
    return _core.build_info()


def get_cmake_dir() -> str:
    """Folder of ``pregatedConfig.cmake``: ``cmake -Dpregated_DIR=$(python -c ...)``."""
    path = os.path.join(os.path.dirname(__file__), "lib", "cmake", "pregated")
    if not os.path.isfile(os.path.join(path, "pregatedConfig.cmake")):
        raise FileNotFoundError(
            f"no pregatedConfig.cmake in {path}: this pregated was not installed with its C++ "
            "package; reinstall with `pip install .`"
        )
    return path


def get_include_dir() -> str:
    """Folder holding ``pregated/pregated.h``."""
    return os.path.join(os.path.dirname(__file__), "include")
