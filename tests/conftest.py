import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture
def one_thread():
    """Run a test on one torch thread (bit-exact reductions), restoring the thread count after."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def hook_ids(model):
    """Set of (module id, hook id) for every forward (pre-)hook in ``model``.

    transformers installs its own output-capturing hooks lazily, so tests compare the set
    before and after a vlmsafe context instead of expecting zero.
    """
    out = set()
    for module in model.modules():
        out |= {(id(module), "f", k) for k in module._forward_hooks}
        out |= {(id(module), "p", k) for k in module._forward_pre_hooks}
    return out


@pytest.fixture(scope="session")
def tiny_models():
    """All tiny architectures, built once per session: name -> (model, processor)."""
    from vlmsafe.testing import BUILDERS

    return {name: build() for name, build in BUILDERS.items()}


@pytest.fixture(scope="module")
def family_model():
    """``family_model(name)``: the tiny model and processor of an explicit family (``FAMILY_BUILDERS``), built on first
    use and shared within a test module (a module's tests may edit a model's weights; other modules get their own)."""
    from vlmsafe.testing.families import FAMILY_BUILDERS

    cache: dict = {}

    def get(name):
        if name not in cache:
            cache[name] = FAMILY_BUILDERS[name]()
        return cache[name]

    return get
