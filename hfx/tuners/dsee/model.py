"""DSEE tuner model: injects [`DseeLinear`] layers into a model (PEFT ``BaseTuner``)."""

from __future__ import annotations

import weakref
from typing import Any

import torch
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer, _get_in_out_features
from peft.utils import (
    TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING,
    get_quantization_kwargs,
    resolve_quantization_backend,
)

from .._lora_only import LoraOnlyMethodsMixin
from .._mixed_batch import MixedBatchTunerMixin
from .._targets import TargetHintMixin, target_hint
from .config import DseeConfig
from .layer import DseeLayer, DseeLinear


def _supports(base: torch.nn.Module) -> bool:
    if isinstance(base, torch.nn.Linear):
        return True
    backend = resolve_quantization_backend(base)
    return backend is not None and backend.layer_type == "linear"


class DseeModel(TargetHintMixin, LoraOnlyMethodsMixin, MixedBatchTunerMixin, BaseTuner):
    """DSEE adapters (arXiv 2111.00160) as a PEFT tuner; build it with ``get_peft_model(model, DseeConfig())``.

    The default targets are PEFT's LoRA targets for the architecture, i.e. the query and value projections, which is
    the paper's choice. Pruning the final weights is [`hfx.tuners.dsee.prune`].
    """

    prefix: str = "dsee_"
    tuner_layer_cls = DseeLayer
    target_module_mapping = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

    def inject_adapter(self, model: torch.nn.Module, adapter_name: str, *args: Any, **kwargs: Any) -> None:
        """As PEFT's; an adapter added to an already pruned model trains on (and only works with) the pruned base,
        so its config is marked pruned too and its ``save_pretrained`` writes the masks (a second adapter used to be
        saved without them, and loaded alone it ran on the unpruned base)."""
        super().inject_adapter(model, adapter_name, *args, **kwargs)
        from .prune import _is_pruned

        config = self.peft_config.get(adapter_name)
        if isinstance(config, DseeConfig) and not config.pruned and _is_pruned(model):
            owners = [getattr(c, "_pruned_model", None) for c in self.peft_config.values() if c is not config]
            config.pruned = True
            config._pruned_model = next((o for o in owners if o is not None), None) or weakref.ref(model)
            config._pruned_on_load = True  # marked here, not saved pruned: a load has no masks of its own to fetch

    def _create_and_replace(
        self,
        dsee_config: DseeConfig,
        adapter_name: str,
        target: torch.nn.Module,
        target_name: str,
        parent: torch.nn.Module,
        current_key: str,
        **optional_kwargs: Any,
    ) -> None:
        base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
        if not _supports(base):
            raise TypeError(
                f"DSEE cannot adapt {current_key!r} of type {type(base).__name__}: only torch.nn.Linear (optionally "
                "quantized with bitsandbytes, ...) is supported. " + target_hint(base, "DSEE")
            )
        in_features, out_features = _get_in_out_features(base)
        kwargs = {
            "r": dsee_config.r,
            "lora_alpha": dsee_config.lora_alpha,
            "num_sparse": dsee_config.budget(out_features, in_features),
            "sparse_method": dsee_config.method_for(out_features, in_features),
            "lora_dropout": dsee_config.lora_dropout,
            "init_lora_weights": dsee_config.init_lora_weights,
            "selection": {
                "sparse_rank": dsee_config.sparse_rank,
                "seed": dsee_config.seed,
                "grebsmo_max_iters": dsee_config.grebsmo_max_iters,
                "grebsmo_rank_step": dsee_config.grebsmo_rank_step,
                "grebsmo_threshold": dsee_config.grebsmo_threshold,
                "sync_indices": dsee_config.sync_indices,
            },
            **get_quantization_kwargs(self),
        }
        if isinstance(target, DseeLayer):
            target.update_layer(adapter_name, **kwargs)
            return
        new_module = DseeLinear(target, adapter_name, layer_name=current_key, **kwargs)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)  # an added, inactive adapter is not trainable until set_adapter
        self._replace_module(parent, target_name, new_module, target)
