"""The example scripts import their shared helpers (``examples/_launch.py``) as a sibling module, as they do when run
as scripts; tests that load a script from its path need that folder on ``sys.path`` too (``load_example``)."""

import importlib.util
import os
import sys

import pytest

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "examples")
if EXAMPLES not in sys.path:
    sys.path.insert(0, EXAMPLES)


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"hfx_example_{name}", os.path.join(EXAMPLES, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def load_example():
    """``load_example("sft")``: the module of ``examples/sft.py`` (its ``parse_args``, method tables, ...)."""
    return _load
