"""pregated: Mixture-of-Experts inference on one GPU smaller than the model.

Expert weights live in host memory; a pre-gate predicts the experts of the next MoE block and
the runtime copies them to the GPU while the current block computes.
"""

from __future__ import annotations

import os
import sys

from . import _core
from ._core import Runtime, expert_bytes, format_bytes, parse_bytes

__version__ = _core.build_info()["version"]


class _RegisterWhenImported:
    """Registers "pregated" in transformers' experts interface as soon as transformers'
    `integrations.moe` is imported (at once if it already is), so that
    AutoModelForCausalLM.from_config(..., experts_implementation="pregated") finds it after
    `import pregated` without making every `import pregated` pay for importing transformers."""

    target = "transformers.integrations.moe"

    def find_spec(self, name, path=None, target=None):
        if name != self.target:
            return None
        import importlib.util

        sys.meta_path.remove(self)
        try:
            spec = importlib.util.find_spec(name)
        finally:
            sys.meta_path.insert(0, self)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_and_register(module):
            exec_module(module)
            sys.meta_path.remove(self)
            from .experts import register

            register()

        spec.loader.exec_module = exec_and_register
        return spec


if _RegisterWhenImported.target in sys.modules:
    from .experts import register as _register

    _register()
else:
    sys.meta_path.insert(0, _RegisterWhenImported())

# The Python front, imported on first use so that `import pregated` (and the CLI's --help)
# stays light: `from pregated import Engine` works as usual.
_LAZY = {
    "Engine": "engine",
    "GenerationResult": "generation",
    "SamplingParams": "generation",
    "TextStream": "generation",
    "SyntheticModel": "synthetic",
    "demo_model": "demo",
    "from_pretrained": "pretrained",
    "offload": "pretrained",
}

__all__ = [
    "Engine",
    "GenerationResult",
    "Runtime",
    "SamplingParams",
    "SyntheticModel",
    "TextStream",
    "build_info",
    "demo_model",
    "expert_bytes",
    "format_bytes",
    "from_pretrained",
    "get_cmake_dir",
    "get_include_dir",
    "offload",
    "parse_bytes",
]


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'pregated' has no attribute '{name}'")
    import importlib

    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


def build_info() -> dict:
    """What this build holds and what it can use now.

    Returns a dict with ``cuda`` (CUDA backend compiled in), ``cuda_devices`` (usable CUDA
    devices right now), ``blas`` (the library behind the CPU backend's GEMMs), ``version`` and
    ``cuda_archs`` (GPU architectures the kernels were built for).
    """
    return _core.build_info()


def get_cmake_dir() -> str:
    """Folder of ``pregatedConfig.cmake``: ``cmake -Dpregated_DIR=$(python -c ...)``."""
    path = os.path.join(_install_dir(), "lib", "cmake", "pregated")
    if not os.path.isfile(os.path.join(path, "pregatedConfig.cmake")):
        raise FileNotFoundError(
            f"no pregatedConfig.cmake in {path}: this pregated was not installed with its C++ "
            "package; reinstall with `pip install .`"
        )
    return path


def get_include_dir() -> str:
    """Folder holding ``pregated/pregated.h``."""
    return os.path.join(_install_dir(), "include")


def _install_dir() -> str:
    # Next to the compiled module: the same folder as this file in a regular install, the
    # build's install folder in an editable one.
    return os.path.dirname(_core.__file__)
