"""Layer behaviour hfx needs from PEFT that older supported releases (0.20) get wrong."""

from __future__ import annotations

from typing import Optional

import torch
from peft.tuners._buffer_dict import BufferDict
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils.integrations import gather_params_ctx
from torch import nn

from ._quantized import QuantizedBaseMixin
from ._sparse import check_index_sets


def _check_loaded_indices(layer, state_dict, prefix, local_metadata, strict, missing, unexpected, error_msgs) -> None:
    """``load_state_dict`` pre-hook of an :class:`IndexedTunerLayer`: its incoming index sets fit (see
    :func:`check_index_sets`)."""
    check_index_sets(
        state_dict,
        prefix,
        layer.index_sets,
        layer.index_space(),
        f"{layer.method_name} {layer._describe()}",
        error_msgs,
        shape_attr=layer.index_shape_attr,
    )


class IndexedTunerLayer(QuantizedBaseMixin, BaseTunerLayer):
    """A ``BaseTunerLayer`` whose adapters hold integer index buffers (LIFT, PaCA, ...).

    PEFT 0.20 moves every adapter tensor to the base layer's device *and dtype*, which turns index buffers into floats
    (and rounds indices above 2**24 in float32); PEFT 0.21 skips integer tensors. This keeps the 0.21 behaviour on
    every supported release: floating tensors follow the base layer's floating dtype, integer ones only its device.
    """

    def _move_adapter_to_device_of_base_layer(self, adapter_name: str, device: Optional[torch.device] = None) -> None:
        base_layer = self.get_base_layer()
        base_device, base_dtype = self._get_base_layer_device_and_dtype(base_layer)
        device = device if device is not None else base_device
        if device is None:
            return
        float_dtype = base_dtype if base_dtype is not None and base_dtype.is_floating_point else None
        for name in self.adapter_layer_names + self.other_param_names:
            container = getattr(self, name, None)
            if (
                not isinstance(container, (nn.ModuleDict, nn.ParameterDict, BufferDict))
                or adapter_name not in container
            ):
                continue
            if any(p.device.type == "meta" for p in container.parameters()):
                continue
            item = container[adapter_name]
            dtype = getattr(item, "dtype", None)
            if float_dtype is not None and (dtype is None or dtype.is_floating_point):
                container[adapter_name] = item.to(device, dtype=float_dtype)
            else:
                container[adapter_name] = item.to(device)

    method_name = "hfx"  # the tuner's name in error messages
    # what a load checks of the adapter's flat indices (:func:`check_index_sets`): (indices, values, sorted and
    # unique) attribute names, and the WeightShapes attribute holding the saved (out, in), if the layer has one
    index_sets: tuple[tuple[str, str, bool], ...] = ()
    index_shape_attr: Optional[str] = None

    def index_space(self) -> int:
        """The positions the flat indices address: the weight's entries (PaCA: its input columns)."""
        return self.out_features * self.in_features

    def _check_indices_on_load(self) -> None:
        """Register the load check of :attr:`index_sets` (call at the end of ``__init__``)."""
        self.register_load_state_dict_pre_hook(_check_loaded_indices)

    def _describe(self) -> str:
        return f"layer {self.layer_name!r} (in_features={self.in_features}, out_features={self.out_features})"

    @torch.no_grad()
    def selection_base_weight(self) -> torch.Tensor:
        """The weight a new adapter's entries are selected on: the base weight, with the updates of adapters merged
        into it taken out again, so that the selection is the one the unmerged layer makes (it used to depend on
        what happened to be merged; a loaded adapter's saved indices replace it anyway). Merging added
        ``get_delta_weight``, so that is what comes off (up to the rounding of the add and the subtraction)."""
        weight = self.dense_base_weight()
        for adapter in self.merged_adapters:
            weight -= self.get_delta_weight(adapter).to(weight)
        return weight

    @torch.no_grad()
    def dense_base_weight(self) -> torch.Tensor:
        """The base weight as a dense fp32 tensor on its device: gathered under ZeRO-3, de-quantized if quantized."""
        if self.quantization_backend is not None:
            if not self.quantization_backend.supports_merge:
                raise ValueError(
                    f"{self.method_name} needs the dense weight of {self._describe()} to select its entries, but it is "
                    f"quantized with {self.quantization_backend.backend_name!r}, which cannot be de-quantized."
                )
            return self.get_base_weight().float()
        weight = self.get_base_layer().weight
        with gather_params_ctx(weight, modifier_rank=None):
            return weight.detach().float().clone()
