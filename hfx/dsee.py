"""``hfx.dsee``: DSEE's pruning of the final weights and selection helpers (alias of ``hfx.tuners.dsee``)."""

from .tuners.dsee import (  # noqa: F401
    DseeConfig,
    DseeModel,
    dsee_select,
    grebsmo,
    load_pruning,
    prune,
    remove_pruned_heads,
    save_pruning,
)

__all__ = [
    "DseeConfig",
    "DseeModel",
    "dsee_select",
    "grebsmo",
    "load_pruning",
    "prune",
    "remove_pruned_heads",
    "save_pruning",
]
