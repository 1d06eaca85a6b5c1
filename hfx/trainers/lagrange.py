r"""Lagrange multipliers of constrained RLHF (Moskovitz et al., ICLR 2024, arXiv 2310.04373, §4 and Eq. 4.4).

Pure state and arithmetic, no trainer: :class:`LagrangeMultipliers` holds the raw multipliers μ, the SGD momentum
buffer and the thresholds, turns them into reward weights, and takes one step from the batch means ``J`` of the
constrained rewards. The step minimises ``Σ_i s_i·m_i(μ_i)·(J_i − θ_i)`` (``s_i = +1`` for ``ge``/``eq``, ``−1``
for ``le``): a violated ``ge`` constraint (``J_i < θ_i``) raises its multiplier, hence its reward's weight.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

__all__ = ["LagrangeMultipliers"]


def _sigmoid(v: float) -> float:
    """σ(v) without overflow: ``math.exp(-v)`` overflows below v ≈ -709 (a constraint met by a wide margin)."""
    if v >= 0:
        return 1.0 / (1.0 + math.exp(-v))
    e = math.exp(v)
    return e / (1.0 + e)


class LagrangeMultipliers:
    """Multipliers for ``kinds`` (``"ge"``/``"le"``/``"eq"``) constraints with ``thresholds``; see the module doc.

    ``parametrization="sigmoid"``: ``m = σ(μ)`` (``tanh(μ)`` for ``eq``); ``"projected"``: ``m = μ`` clipped to
    ``[0, max_value]`` (``[−max_value, max_value]`` for ``eq``) after each step.
    """

    def __init__(
        self,
        kinds: Sequence[str],
        thresholds: Sequence[float],
        *,
        lr: float = 0.1,
        momentum: float = 0.1,
        parametrization: str = "sigmoid",
        init: Sequence[float] | None = None,
        max_value: float = 10.0,
        max_grad_norm: float | None = None,
    ) -> None:
        if len(kinds) != len(thresholds):
            raise ValueError(f"{len(kinds)} constraint kinds for {len(thresholds)} thresholds")
        self.kinds = list(kinds)
        self.thresholds = [float(t) for t in thresholds]
        self.lr, self.momentum, self.parametrization = float(lr), float(momentum), parametrization
        self.max_value, self.max_grad_norm = float(max_value), max_grad_norm
        self.raw = [float(v) for v in (init if init is not None else [0.0] * len(kinds))]
        self.buffer: list[float] | None = None  # SGD momentum buffer (PyTorch semantics: none before the first step)
        self.steps = 0
        if parametrization == "projected":
            self.raw = [self._project(i, v) for i, v in enumerate(self.raw)]

    # ------------------------------------------------------------------------------------------------ values
    def _project(self, i: int, value: float) -> float:
        low = -self.max_value if self.kinds[i] == "eq" else 0.0
        return min(max(value, low), self.max_value)

    def values(self) -> list[float]:
        """The multipliers ``m_i`` as applied (σ(μ), tanh(μ) or the projected μ)."""
        if self.parametrization == "projected":
            return list(self.raw)
        return [math.tanh(v) if k == "eq" else _sigmoid(v) for k, v in zip(self.kinds, self.raw)]

    def derivatives(self) -> list[float]:
        """``dm_i/dμ_i`` at the current μ."""
        if self.parametrization == "projected":
            return [1.0] * len(self.raw)
        out = []
        for kind, value in zip(self.kinds, self.values()):
            out.append(1.0 - value * value if kind == "eq" else value * (1.0 - value))
        return out

    def task_weight(self) -> float:
        """Weight of the task reward (and of the KL, when scaled): ``N − Σ|m_i|`` over ge/eq constraints (sigmoid)."""
        if self.parametrization == "projected":
            return 1.0
        mixed = [abs(m) for k, m in zip(self.kinds, self.values()) if k in ("ge", "eq")]
        return float(len(mixed) - sum(mixed)) if mixed else 1.0

    def reward_weights(self, base: Sequence[float], constrained: Sequence[int]) -> list[float]:
        """Weights for all reward functions: task rewards ``α_j·task_weight``, constraints as in the module doc."""
        c0 = self.task_weight()
        weights = [float(a) * c0 for a in base]
        for index, kind, m in zip(constrained, self.kinds, self.values(), strict=True):
            weights[index] = float(base[index]) - m if kind == "le" else m
        return weights

    # ------------------------------------------------------------------------------------------------ update
    def gradient(self, values: Sequence[float]) -> list[float]:
        """``∂/∂μ_i`` of ``Σ s_i·m_i·(J_i − θ_i)``; 0 where ``J_i`` is NaN (no sample was scored)."""
        grads = []
        for kind, d, j, theta in zip(self.kinds, self.derivatives(), values, self.thresholds):
            sign = -1.0 if kind == "le" else 1.0
            grads.append(0.0 if math.isnan(j) else sign * d * (float(j) - theta))
        return grads

    def step(self, values: Sequence[float]) -> list[float]:
        """One SGD-with-momentum step from the batch means ``values`` (``J``); returns the gradient used."""
        if len(values) != len(self.raw):
            raise ValueError(f"{len(values)} constraint values for {len(self.raw)} constraints")
        infinite = [i for i, v in enumerate(values) if math.isinf(float(v))]
        if infinite:
            raise ValueError(
                f"constraint {infinite[0]}'s batch mean reward is {float(values[infinite[0]])}: the multiplier update "
                "needs finite rewards; check that reward function (NaN, i.e. no scored sample, is skipped)."
            )
        grad = self.gradient(values)
        if self.max_grad_norm is not None:
            norm = math.sqrt(sum(g * g for g in grad))
            if norm > self.max_grad_norm:
                grad = [g * self.max_grad_norm / norm for g in grad]
        if self.buffer is None or self.momentum == 0:
            self.buffer = list(grad)
        else:
            self.buffer = [self.momentum * b + g for b, g in zip(self.buffer, grad)]
        self.raw = [v - self.lr * b for v, b in zip(self.raw, self.buffer)]
        if self.parametrization == "projected":
            self.raw = [self._project(i, v) for i, v in enumerate(self.raw)]
        self.steps += 1
        return grad

    # ------------------------------------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {
            "raw": list(self.raw),
            "buffer": self.buffer,
            "thresholds": list(self.thresholds),
            "steps": self.steps,
            "kinds": list(self.kinds),
            "parametrization": self.parametrization,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`, thresholds included (a threshold search moves them away from the config's).

        Raises ``ValueError`` when the saved constraint kinds or parametrization differ from this object's: the raw
        μ are only meaningful under the ones they were trained with (σ(μ) vs a clipped μ; a ``ge`` multiplier's
        weight is ``m``, an ``le`` one's ``α − m``), so resuming would silently apply different reward weights.
        States saved before these fields existed load unchecked.
        """
        for field in (
            "raw",
            "buffer",
            "thresholds",
        ):  # an edited state file used to drop a multiplier at its next step
            saved = state.get(field)
            if saved is not None and len(saved) != len(self.raw):
                raise ValueError(
                    f"the saved multiplier state's {field!r} has {len(saved)} values for this trainer's {len(self.raw)} "
                    "constraints; resume with the constraints that saved it, or fix the list"
                )
            if saved is not None and not all(isinstance(v, (int, float)) and math.isfinite(v) for v in saved):
                raise ValueError(f"the saved multiplier state's {field!r} holds a value that is not a finite number")
        kinds = state.get("kinds")
        if kinds is not None and list(kinds) != self.kinds:
            raise ValueError(
                f"the checkpoint's constraint kinds {list(kinds)} differ from constraint_types {self.kinds}; resume "
                f"with constraint_types={list(kinds)}, or start a new run (not resume_from_checkpoint) to change them"
            )
        parametrization = state.get("parametrization")
        if parametrization is not None and parametrization != self.parametrization:
            raise ValueError(
                f"the checkpoint's multipliers use lagrange_parametrization={parametrization!r}, this run "
                f"{self.parametrization!r}; resume with lagrange_parametrization={parametrization!r}, or start a new "
                "run (not resume_from_checkpoint) to change it"
            )
        self.raw = [float(v) for v in state["raw"]]
        if self.parametrization == "projected":  # a hand-edited μ outside [0, max_value] would weight rewards so
            self.raw = [self._project(i, v) for i, v in enumerate(self.raw)]
        self.buffer = None if state.get("buffer") is None else [float(v) for v in state["buffer"]]
        self.thresholds = [float(v) for v in state.get("thresholds", self.thresholds)]
        self.steps = int(state.get("steps", 0))
