r"""Maths of dynamic reward weighting (Lu et al., 2025, arXiv 2509.11452), free of any trainer.

- Hypervolume (HV) of a set of objective vectors w.r.t. a reference point (exact, recursive slicing; all objectives
  maximised), the Pareto-front buffer and the meta-reward ``r_pareto = 0.5 + 1.5·tanh(ΔHV)`` (Alg. 1).
- The mirror-descent step on the simplex ``log w ← log w + (η/μ)·G·1`` (Alg. 2) and the per-objective Gram matrix
  of policy gradients taken w.r.t. **activations** of ``nn.Linear`` layers: ``∇W = Σ_{b,t} δᵀx`` with ``δ = ∂L/∂y``,
  ``x`` the layer input and ``y`` its output — exact, and it never touches a parameter's ``.grad`` (the trainer
  still refuses ZeRO-3: the backward to the activations runs through partitioned weights).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

__all__ = [
    "ActivationGradientCapture",
    "HypervolumeBuffer",
    "dominates",
    "gram_from_activations",
    "hypervolume",
    "mirror_descent_step",
    "pareto_front",
    "pareto_meta_reward",
    "select_linear_modules",
]


# ------------------------------------------------------------------------------------------------ hypervolume
def dominates(a: Sequence[float], b: Sequence[float]) -> bool:
    """``a`` weakly dominates ``b`` (maximisation): ``a_i >= b_i`` for all i."""
    return all(x >= y for x, y in zip(a, b, strict=True))


def pareto_front(points: Sequence[Sequence[float]]) -> list[tuple[float, ...]]:
    """The non-dominated points (maximisation), duplicates removed, in input order."""
    pts = [tuple(float(x) for x in p) for p in points]
    out: list[tuple[float, ...]] = []
    for i, p in enumerate(pts):
        if p in out:
            continue
        if any(dominates(q, p) and q != p for j, q in enumerate(pts) if j != i):
            continue
        out.append(p)
    return out


def _hv(points: list[tuple[float, ...]], ref: tuple[float, ...]) -> float:
    if not points:
        return 0.0
    if len(ref) == 1:
        return max(p[0] for p in points) - ref[0]
    # slice along dimension 0: between consecutive distinct coordinates x_{j-1} < x_j, the points with p_0 >= x_j
    # cover the slice, projected onto the remaining dimensions
    xs = sorted({p[0] for p in points})
    total, lower = 0.0, ref[0]
    for x in xs:
        active = [p[1:] for p in points if p[0] >= x]
        total += (x - lower) * _hv(active, ref[1:])
        lower = x
    return total


def hypervolume(points: Sequence[Sequence[float]], ref: Sequence[float]) -> float:
    """Exact hypervolume (maximisation) of the region dominated by ``points`` and dominating ``ref``.

    Points not strictly better than ``ref`` in every objective add nothing. Exact recursive slicing on the Pareto
    front: O(n^d) for n points in d objectives — meant for the handful of objectives of reward weighting (with 4, a
    front of ~80 points takes ~0.2 s in this pure-Python recursion; :class:`HypervolumeBuffer` computes it once per
    accepted point).
    """
    ref = tuple(float(r) for r in ref)
    if any(len(p) != len(ref) for p in points):
        raise ValueError(f"every point needs {len(ref)} coordinates (as many as the reference)")
    kept = [p for p in pareto_front(points) if all(x > r for x, r in zip(p, ref))]
    return _hv(kept, ref)


def pareto_meta_reward(delta_hv: float) -> float:
    """Eq. 1: ``r_pareto = 0.5 + 1.5·tanh(ΔHV)``, in ``[0.5, 2)`` for ``ΔHV >= 0``."""
    return 0.5 + 1.5 * math.tanh(max(float(delta_hv), 0.0))


@dataclass
class HypervolumeBuffer:
    """Alg. 1's buffer B: ``reference`` = B[0] (performance before training), ``front`` = the accepted points.

    Objective vectors are given in their natural orientation; ``maximize[i] = False`` negates objective i. Only the
    Pareto front of the accepted points is kept (dominated points add no hypervolume).
    """

    maximize: list[bool]
    reference: list[float] | None = None
    front: list[list[float]] = field(default_factory=list)
    r_pareto: float = 1.0
    last_delta: float = 0.0
    num_updates: int = 0
    # (front, reference) -> HV(front): each update needs it and the trainer logs it; recomputed when either changes
    # (also by direct assignment or dataclasses.replace)
    _front_hv: tuple[Any, float] | None = field(default=None, init=False, compare=False, repr=False)

    def _orient(self, v: Sequence[float]) -> tuple[float, ...]:
        if len(v) != len(self.maximize):
            raise ValueError(f"objective vector has {len(v)} values, maximize has {len(self.maximize)}")
        return tuple(float(x) if m else -float(x) for x, m in zip(v, self.maximize))

    def hypervolume(self) -> float:
        if self.reference is None:
            return 0.0
        key = (tuple(map(tuple, self.front)), tuple(self.reference))
        if self._front_hv is None or self._front_hv[0] != key:
            self._front_hv = key, hypervolume([self._orient(p) for p in self.front], self._orient(self.reference))
        return self._front_hv[1]

    def update(self, v: Sequence[float]) -> float:
        """Add the new evaluation ``v``; returns (and stores) the meta-reward for the next step.

        The first vector becomes the reference (r_pareto stays 1). Afterwards ΔHV = HV(B ∪ {v}) − HV(B); v joins B
        when ΔHV > 0 and r_pareto = 0.5 + 1.5·tanh(ΔHV). NaN components (an objective nobody scored) skip the update.
        """
        v = [float(x) for x in v]
        if any(math.isnan(x) for x in v):
            return self.r_pareto
        if any(math.isinf(x) for x in v):  # it would join the front, and the next ΔHV would be inf − inf = NaN
            raise ValueError(f"objective vector {v} is not finite: the hypervolume needs finite values (NaN skips)")
        self.num_updates += 1
        if self.reference is None:
            self._orient(v)
            self.reference = v
            self.last_delta = 0.0
            return self.r_pareto
        ref = self._orient(self.reference)
        oriented = [self._orient(p) for p in self.front]
        before = self.hypervolume()
        after = hypervolume([*oriented, self._orient(v)], ref)
        delta = max(after - before, 0.0)
        self.last_delta = delta
        self.r_pareto = pareto_meta_reward(delta)
        if delta > 0:
            keep = pareto_front([*oriented, self._orient(v)])
            self.front = [p for p in [*self.front, v] if self._orient(p) in keep]
            # the same points in the same order: hypervolume() would give these bits
            self._front_hv = (tuple(map(tuple, self.front)), tuple(self.reference)), after
        return self.r_pareto

    def state_dict(self) -> dict[str, Any]:
        return {
            "maximize": list(self.maximize),
            "reference": self.reference,
            "front": [list(p) for p in self.front],
            "r_pareto": self.r_pareto,
            "last_delta": self.last_delta,
            "num_updates": self.num_updates,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if list(state["maximize"]) != list(self.maximize):
            raise ValueError(f"the checkpoint's maximize {state['maximize']} differs from {self.maximize}")
        self.reference = None if state["reference"] is None else [float(x) for x in state["reference"]]
        self.front = [[float(x) for x in p] for p in state["front"]]
        self.r_pareto = float(state["r_pareto"])
        self.last_delta = float(state.get("last_delta", 0.0))
        self.num_updates = int(state.get("num_updates", 0))


# ------------------------------------------------------------------------------------------------ mirror descent
def mirror_descent_step(log_weights: torch.Tensor, gram: torch.Tensor, step_size: float) -> torch.Tensor:
    """Alg. 2 / Eq. 3: ``log w + step_size·G·1`` (influence ``I_k = Σ_j G_kj``), renormalised so that
    ``softmax`` of the result is the new ``w``. Returns the new log-weights (``log_softmax``; ``-inf`` stays)."""
    influence = gram.to(log_weights.dtype).sum(dim=1)
    return torch.log_softmax(log_weights + step_size * influence, dim=0)


# ------------------------------------------------------------------------------------------------ activation gradients
# the numbered decoder-layer lists of transformers' models: Llama/Qwen/NeoX/OPT ``layers``, GPT-2/GPT-J/Falcon/BLOOM
# ``h``, MPT ``blocks``
_LAYER_RE = re.compile(r"(?:^|\.)(?:layers|h|blocks)\.(\d+)\.")


def _decoder_module_ids(model: nn.Module) -> set[int] | None:
    """The modules of the language decoder (transformers' ``get_decoder()``: a VLM's language model, not its vision
    tower, whose ``blocks.<i>`` / ``layers.<i>`` would count as decoder layers), or ``None`` where there is none."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    try:
        decoder = base.get_decoder() if hasattr(base, "get_decoder") else None
    except Exception:  # noqa: BLE001 - a model without a decoder: no restriction
        return None
    if not isinstance(decoder, nn.Module) or decoder is base:
        return None
    return {id(m) for m in decoder.modules()}


def _tuner_layer_prefixes(model: nn.Module) -> set[str]:
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:  # pragma: no cover - peft is a dependency
        return set()
    return {name for name, m in model.named_modules() if isinstance(m, BaseTunerLayer)}


def select_linear_modules(
    model: nn.Module, layer_ids: Sequence[int] | None = None, patterns: Sequence[str] | None = None
) -> list[tuple[str, nn.Linear]]:
    """The ``nn.Linear`` modules whose weight gradients enter the Gram matrix, in module order.

    Candidates are the ``nn.Linear`` layers of the language decoder (``get_decoder()``) inside its numbered layers
    (``….layers.<i>.…``, ``h.<i>``, ``blocks.<i>``); for PEFT
    models the ``base_layer`` Linear of each adapted module (adapter sub-layers such as ``lora_A`` are skipped).
    ``layer_ids`` (default: the middle half, ``range(L // 4, L − L // 4)``) picks decoder layers; ``patterns``
    (regular expressions, ``re.search`` on the module name) narrows further. ``lm_head`` is never included.
    """
    tuners = _tuner_layer_prefixes(model)
    decoder = _decoder_module_ids(model)
    candidates: list[tuple[str, nn.Linear, int]] = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or name.split(".")[-1] == "lm_head":
            continue
        if decoder is not None and id(module) not in decoder:
            continue  # e.g. a vision tower's layers
        owner = next((t for t in tuners if name.startswith(t + ".")), None)
        if owner is not None and name != owner + ".base_layer":
            continue  # an adapter's own Linear (lora_A, ...)
        match = _LAYER_RE.search(name)
        if match is None:
            continue
        candidates.append((name, module, int(match.group(1))))
    if not candidates:
        raise ValueError(
            "no nn.Linear inside numbered decoder layers ('layers.<i>.', 'h.<i>.' or 'blocks.<i>.') found for the "
            "weight gradients (transformers' Conv1D, GPT-2 style, is not an nn.Linear); use weighting='hypervolume'"
        )
    ids = sorted({i for _, _, i in candidates})
    if layer_ids is None:
        n = len(ids)
        chosen = set(ids[n // 4 : n - n // 4])
    else:
        missing = sorted(set(layer_ids) - set(ids))
        if missing:
            raise ValueError(f"weight_grad_layers: no decoder layer {missing}; the model has layers {ids}")
        chosen = set(layer_ids)
    out = [(n, m) for n, m, i in candidates if i in chosen]
    if patterns:
        regexes = [re.compile(p) for p in patterns]
        out = [(n, m) for n, m in out if any(r.search(n) for r in regexes)]
    if not out:
        names = [n for n, _, i in candidates if i in chosen]
        raise ValueError(
            f"weight_grad_modules {list(patterns or [])} match none of the selected Linear layers {names}"
        )
    return out


class ActivationGradientCapture:
    """Forward hooks that record each selected Linear's input ``x`` and output ``y`` during one forward.

    ``y`` stays the graph node it is when it requires grad (so gradient paths through later hooked layers are
    intact); only when nothing upstream is trainable (``y`` needs no grad) is it replaced by a leaf
    ``y.detach().requires_grad_()``. Use as a context manager around the forward; ``records`` are in call order.
    """

    def __init__(self, modules: Sequence[tuple[str, nn.Linear]]):
        self.modules = list(modules)
        self.records: list[tuple[str, nn.Linear, torch.Tensor, torch.Tensor]] = []
        self._handles: list[Any] = []
        self.active = False

    def _hook(self, name: str) -> Callable:
        def hook(module, args, output):
            if not self.active:
                return None
            x = args[0].detach()
            y = output
            replaced = None
            if not y.requires_grad:
                y = replaced = output.detach().requires_grad_()
            self.records.append((name, module, x, y))
            return replaced

        return hook

    def __enter__(self) -> ActivationGradientCapture:
        self.records = []
        self._handles = [m.register_forward_hook(self._hook(n)) for n, m in self.modules]
        self.active = True
        return self

    def stop(self) -> None:
        """Stop recording (e.g. before backward, so recomputation under checkpointing records nothing)."""
        self.active = False

    def __exit__(self, *exc) -> None:
        self.active = False
        for h in self._handles:
            h.remove()
        self._handles = []


def gram_from_activations(
    losses: Sequence[torch.Tensor],
    records: Sequence[tuple[str, nn.Linear, torch.Tensor, torch.Tensor]],
    all_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """``G_kj = Σ_layers ⟨∇W_k, ∇W_j⟩`` (weights and biases) of the K ``losses`` w.r.t. the recorded Linear layers.

    ``δ_k = ∂L_k/∂y`` for every recorded output (one ``autograd.grad`` per loss, ``retain_graph``), then per layer
    ``∇W_k = Σ_{b,t} δ_kᵀ x`` and ``∇b_k = Σ_{b,t} δ_k``, summed over processes by ``all_reduce`` (layer by layer,
    so only one layer's K gradients are ever materialised) before the inner products. A layer called several times
    in the forward (shared weights) has its calls summed.
    """
    ys = [r[3] for r in records]
    deltas: list[list[torch.Tensor | None]] = []
    for k, loss in enumerate(losses):
        grads = torch.autograd.grad(loss, ys, retain_graph=k < len(losses) - 1, allow_unused=True)
        deltas.append(list(grads))
    K = len(losses)
    gram = torch.zeros(K, K, dtype=torch.float64)
    by_module: dict[int, list[int]] = {}
    for i, (_, module, _, _) in enumerate(records):
        by_module.setdefault(id(module), []).append(i)
    for calls in by_module.values():
        module = records[calls[0]][1]
        out_f, in_f = module.out_features, module.in_features
        has_bias = module.bias is not None
        flat = []
        for k in range(K):
            gw = torch.zeros(out_f, in_f, dtype=dtype, device=records[calls[0]][2].device)
            gb = torch.zeros(out_f if has_bias else 0, dtype=dtype, device=gw.device)
            for i in calls:
                d = deltas[k][i]
                if d is None:
                    continue
                x = records[i][2].reshape(-1, in_f).to(dtype)
                d = d.reshape(-1, out_f).to(dtype)
                gw += d.T @ x
                if has_bias:
                    gb += d.sum(0)
            flat.append(torch.cat([gw.reshape(-1), gb]))
        stacked = torch.stack(flat)  # (K, P_layer)
        if all_reduce is not None:
            stacked = all_reduce(stacked)
        gram += (stacked @ stacked.T).double().cpu()
        del stacked, flat
    return gram
