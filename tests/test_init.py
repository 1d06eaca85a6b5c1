"""hfx's top-level namespace: everything it resolves lazily is public (in ``__all__``) and resolves."""

from __future__ import annotations

import hfx


def test_lazy_names_are_in_all_and_resolve():
    # ConstrainedGRPO/RLOO* and ThresholdSearchCallback were importable as hfx.X but missing from __all__, so
    # `from hfx import *` and API listings left them out
    lazy = set(hfx._LAZY_ATTRS) | set(hfx._LAZY_SUBMODULES)
    assert lazy - set(hfx.__all__) == set()
    for name in hfx.__all__:
        assert getattr(hfx, name) is not None, name
    namespace: dict = {}
    exec("from hfx import *", namespace)
    assert {"ConstrainedGRPOTrainer", "ThresholdSearchCallback", "MaskedThoughtTrainer"} <= set(namespace)
