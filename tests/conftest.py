import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
REF = os.path.join(ROOT, "tests", "fixtures", "reference")  # a copy of shared/reference

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def ref():
    return REF


@pytest.fixture(scope="session")
def expected():
    from safetensors.torch import load_file
    return load_file(os.path.join(REF, "expected.safetensors"))


@pytest.fixture(scope="session")
def owl_model():
    import owl
    return owl.load_model(os.path.join(REF, "mplug_owl"))
