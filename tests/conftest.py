import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))


def _cuda_devices() -> int:
    import pregated

    try:
        import torch

        if not torch.cuda.is_available():
            return 0
    except ImportError:
        return 0
    return pregated.build_info()["cuda_devices"]


def pytest_collection_modifyitems(config, items):
    import pregated

    info = pregated.build_info()
    if not info["cuda"]:
        reason = "the CUDA backend is not compiled into this build of pregated"
    elif _cuda_devices() == 0:
        reason = "no usable CUDA device on this machine (CUDA backend compiled in, nothing to run it on)"
    else:
        return
    skip = pytest.mark.skip(reason=reason)
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def checkpoint_factory(tmp_path_factory):
    """checkpoint_factory(family, dtype=torch.float32, fused=False, **config) -> folder, cached."""
    import torch

    from tiny_models import make_checkpoint

    made = {}

    def make(family, dtype=torch.float32, fused=False, **over):
        key = (family, dtype, fused, tuple(sorted(over.items())))
        if key not in made:
            name = f"{family}-{str(dtype).replace('torch.', '')}-{'fused' if fused else 'split'}-{len(made)}"
            made[key] = make_checkpoint(str(tmp_path_factory.mktemp(name)), family, dtype=dtype, fused=fused, **over)
        return made[key]

    return make


@pytest.fixture(scope="session")
def mixtral_folder(checkpoint_factory):
    return checkpoint_factory("mixtral")


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


@pytest.fixture
def kernels():
    """kernels(isa): run the CPU backend's decode kernels on `isa` ("best": this CPU's best) until
    the test ends; skips when this CPU cannot."""
    from pregated import _core

    best = _core.cpu_kernel_isa()

    def use(isa):
        if not _core._force_cpu_kernel(best if isa == "best" else isa):
            pytest.skip(f"this CPU cannot run the {isa} kernels")
        return _core.cpu_kernel_isa()

    yield use
    _core._force_cpu_kernel(best)


def decode_step_without_sync(eng, prompt):
    """Prefills `prompt` on a CUDA engine, then runs one decode step's forward with torch's sync
    debug mode raising on any device-to-host synchronisation; returns its logits."""
    import torch

    cache, mask, last, logits = eng._prefill([prompt])
    nxt = logits.argmax(-1)
    mask = torch.cat([mask, mask.new_ones(1, 1)], dim=1)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out, _ = eng._forward(nxt[:, None], mask, (last + 1)[:, None], cache, torch.ones(1, 1, dtype=torch.bool))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return out
