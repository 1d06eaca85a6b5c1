r"""NM-PPO (arXiv 2310.04373, Alg. 3 / App. A.4): find constraint thresholds during one run with Nelder–Mead.

The paper's recursive form cannot run inside a trainer loop, so :class:`NelderMead` is an ask/tell minimiser: the
algorithm is a generator that yields the next point to evaluate and receives its value. Its state is the initial
simplex plus the values told so far; replaying them rebuilds it exactly, which is how it is checkpointed.

:class:`ThresholdSearchCallback` drives it from a constrained trainer: each *phase* trains with the proposed
thresholds until every constrained reward's batch mean is within ``reach_tolerance`` (relative, the paper's ±5 %) of
its threshold or ``phase_max_steps`` steps have passed, then scores the phase with ``eval_fn(trainer)`` (higher is
better; rank 0's value is broadcast) and tells Nelder–Mead ``−score``. Thresholds already scored (within
``cache_tolerance``) are not re-run. When the simplex values' standard deviation falls below ``tol`` (or
``max_phases`` is reached) the best thresholds are kept for the rest of training.

Differences from the authors' code: the initial simplex is deterministic (the configured thresholds plus one axis
step each), where they draw its points uniformly between the initial policy's and the best seen reward values; and
a phase is capped at ``phase_max_steps`` optimizer steps, where theirs run at most a tenth of the run.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Generator, Sequence
from typing import Any

import torch
from transformers import TrainerCallback
from transformers.utils import logging

logger = logging.get_logger(__name__)

__all__ = ["NelderMead", "ThresholdSearchCallback"]


class NelderMead:
    """Ask/tell Nelder–Mead minimiser (reflection 1, expansion 2, contraction 0.5, shrink 0.5 — the paper's values).

    ``ask()`` returns the point to evaluate next, ``tell(value)`` gives its value. ``converged`` once the standard
    deviation of the simplex values is below ``tol``. A point within ``cache_tolerance`` (max-norm) of one already
    evaluated is answered from the cache without being asked.
    """

    def __init__(
        self,
        initial_simplex: Sequence[Sequence[float]],
        *,
        tol: float = 0.01,
        cache_tolerance: float = 0.0,
        reflection: float = 1.0,
        expansion: float = 2.0,
        contraction: float = 0.5,
        shrink: float = 0.5,
    ) -> None:
        simplex = [[float(v) for v in p] for p in initial_simplex]
        dim = len(simplex[0]) if simplex else 0
        if dim == 0 or len(simplex) != dim + 1 or any(len(p) != dim for p in simplex):
            raise ValueError(f"the initial simplex needs N+1 points of dimension N, got {len(simplex)} points")
        self.initial_simplex = simplex
        self.tol, self.cache_tolerance = float(tol), float(cache_tolerance)
        self.coefficients = (reflection, expansion, contraction, shrink)
        self.history: list[tuple[list[float], float]] = []  # every (point, value) told, in order
        self._told: list[float] = []  # values told to the generator (cache answers included), for replay
        self._simplex: list[list[float]] = []
        self._values: list[float] = []
        self._start()

    # ------------------------------------------------------------------------------------------------ algorithm
    def _algorithm(self) -> Generator[list[float], float, None]:
        a, g, c, s = self.coefficients
        sim = [list(p) for p in self.initial_simplex]
        vals = []
        for point in sim:
            vals.append((yield point))
        while True:
            order = sorted(range(len(sim)), key=lambda k: vals[k])
            sim, vals = [sim[k] for k in order], [vals[k] for k in order]
            self._simplex, self._values = sim, vals
            n = len(sim) - 1
            centroid = [sum(p[d] for p in sim[:-1]) / n for d in range(n)]
            worst = sim[-1]

            def along(t: float, centroid=centroid, worst=worst) -> list[float]:  # centroid + t·(centroid − worst)
                return [x + t * (x - w) for x, w in zip(centroid, worst)]

            reflected = along(a)
            f_r = yield reflected
            if f_r < vals[0]:
                expanded = along(a * g)
                f_e = yield expanded
                sim[-1], vals[-1] = (expanded, f_e) if f_e < f_r else (reflected, f_r)
            elif f_r < vals[-2]:
                sim[-1], vals[-1] = reflected, f_r
            else:
                outside = f_r < vals[-1]
                contracted = along(a * c) if outside else along(-c)
                f_c = yield contracted
                if (f_c <= f_r) if outside else (f_c < vals[-1]):
                    sim[-1], vals[-1] = contracted, f_c
                else:
                    best = sim[0]
                    for k in range(1, len(sim)):
                        sim[k] = [b + s * (x - b) for b, x in zip(best, sim[k])]
                        vals[k] = yield sim[k]

    def _start(self) -> None:
        self._gen = self._algorithm()
        self._pending = next(self._gen)

    def _send(self, value: float) -> None:
        self._told.append(float(value))
        self._pending = self._gen.send(float(value))

    def _cached(self, point: Sequence[float]) -> float | None:
        for seen, value in self.history:
            if max(abs(x - y) for x, y in zip(seen, point)) <= self.cache_tolerance:
                return value
        return None

    # ------------------------------------------------------------------------------------------------ ask / tell
    def ask(self) -> list[float]:
        """The next point to evaluate (cached points are answered internally first)."""
        for _ in range(10_000):  # a collapsing simplex inside the cache radius converges; stop answering then
            if not self.history or self.converged or (value := self._cached(self._pending)) is None:
                break
            self._send(value)
        return list(self._pending)

    def tell(self, value: float) -> None:
        """The value at the point last returned by :meth:`ask`."""
        if not math.isfinite(value):
            raise ValueError(f"Nelder-Mead needs a finite value, got {value}")
        self.history.append((list(self._pending), float(value)))
        self._send(value)

    @property
    def converged(self) -> bool:
        if len(self._values) != len(self.initial_simplex):
            return False
        mean = sum(self._values) / len(self._values)
        return math.sqrt(sum((v - mean) ** 2 for v in self._values) / len(self._values)) < self.tol

    @property
    def best(self) -> tuple[list[float], float]:
        """The best point told so far and its value."""
        if not self.history:
            raise ValueError("no point has been evaluated yet")
        point, value = min(self.history, key=lambda item: item[1])
        return list(point), value

    # ------------------------------------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {
            "initial_simplex": self.initial_simplex,
            "tol": self.tol,
            "cache_tolerance": self.cache_tolerance,
            "coefficients": list(self.coefficients),
            "told": list(self._told),
            "history": [[p, v] for p, v in self.history],
        }

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> NelderMead:
        r, e, c, s = state["coefficients"]
        nm = cls(state["initial_simplex"], tol=state["tol"], cache_tolerance=state["cache_tolerance"],
                 reflection=r, expansion=e, contraction=c, shrink=s)  # fmt: skip
        for value in state["told"]:  # replay: the algorithm is deterministic in the values it was told
            nm._send(value)
        nm.history = [(list(p), float(v)) for p, v in state["history"]]
        return nm


class ThresholdSearchCallback(TrainerCallback):
    """Adapt a constrained trainer's thresholds during training with Nelder–Mead (NM-PPO); see the module doc.

    Args:
        eval_fn: ``eval_fn(trainer) -> float``, the held-out score to maximise (e.g. from ``trainer.evaluate()``);
            called on every rank (it may be collective), rank 0's value is used.
        initial_step: the initial simplex is the config's thresholds plus, for each constraint ``i``, a copy with
            ``θ_i`` moved by ``initial_step[i]`` (a float: ``initial_step·max(|θ_i|, 0.1)``).
        phase_max_steps: optimizer steps after which a phase is scored even if the thresholds were not reached.
        reach_tolerance: a threshold is reached when ``|J_i − θ_i| <= reach_tolerance·max(|θ_i|, 1e-3)``.
        tol: stop when the standard deviation of the simplex's scores is below this.
        cache_tolerance: thresholds this close (max-norm) to scored ones reuse their score.
        max_phases: stop after this many scored phases (``None``: no limit).
        bounds: per constraint, ``(low, high)`` (either may be ``None``) that its threshold stays within, e.g.
            ``(0.0, 1.0)`` for a reward in [0, 1]: a proposal outside is clipped before it is trained and scored
            (Nelder–Mead then minimises ``f(clip(θ))``), and an initial step that would leave the box goes the other
            way. ``None``: unbounded.
    """

    def __init__(
        self,
        eval_fn: Callable[[Any], float],
        *,
        initial_step: float | Sequence[float] = 0.1,
        phase_max_steps: int = 50,
        reach_tolerance: float = 0.05,
        tol: float = 0.01,
        cache_tolerance: float = 5e-3,
        max_phases: int | None = None,
        bounds: Sequence[tuple[float | None, float | None]] | None = None,
    ) -> None:
        if phase_max_steps < 1:
            raise ValueError(f"phase_max_steps must be >= 1, got {phase_max_steps}")
        if bounds is not None:
            if any(not isinstance(b, (tuple, list)) or len(b) != 2 for b in bounds):
                raise ValueError(
                    f"bounds: one (low, high) pair per constraint, e.g. [(0.0, 1.0), (None, 0.0)]; got {bounds}"
                )
            bounds = [(None if lo is None else float(lo), None if hi is None else float(hi)) for lo, hi in bounds]
            bad = [b for b in bounds if b[0] is not None and b[1] is not None and not b[0] < b[1]]
            if bad:
                raise ValueError(f"bounds: each (low, high) needs low < high, got {bad[0]}")
        self.bounds = bounds
        self.eval_fn = eval_fn
        self.initial_step = initial_step
        self.phase_max_steps, self.reach_tolerance = int(phase_max_steps), float(reach_tolerance)
        self.tol, self.cache_tolerance, self.max_phases = float(tol), float(cache_tolerance), max_phases
        self.trainer = None
        self.search: NelderMead | None = None
        self.phase_start = 0
        self.phases = 0
        self.done = False

    def bind(self, trainer) -> None:
        """Called by the constrained trainer on construction (callbacks do not otherwise see the trainer)."""
        self.trainer = trainer

    def _inside(self, i: int, value: float) -> bool:
        lo, hi = self.bounds[i] if self.bounds is not None else (None, None)
        return (lo is None or value >= lo) and (hi is None or value <= hi)

    def clip(self, point: Sequence[float]) -> list[float]:
        """``point`` clipped to ``bounds`` (the thresholds a proposal is trained and scored with)."""
        if self.bounds is None:
            return [float(v) for v in point]
        out = []
        for v, (lo, hi) in zip(point, self.bounds):
            v = float(v) if lo is None else max(float(v), lo)
            out.append(v if hi is None else min(v, hi))
        return out

    def _initial_simplex(self, thresholds: Sequence[float]) -> list[list[float]]:
        steps = self.initial_step
        if isinstance(steps, (int, float)):
            steps = [float(steps) * max(abs(t), 0.1) for t in thresholds]
        if len(steps) != len(thresholds):
            raise ValueError(f"initial_step has {len(steps)} values for {len(thresholds)} constraints")
        if self.bounds is not None and len(self.bounds) != len(thresholds):
            raise ValueError(f"bounds has {len(self.bounds)} entries for {len(thresholds)} constraints")
        outside = [i for i, t in enumerate(thresholds) if not self._inside(i, t)]
        if outside:
            i = outside[0]
            raise ValueError(f"constraint threshold {i} ({thresholds[i]}) is outside its bounds {self.bounds[i]}")
        simplex = [list(thresholds)]
        for i, step in enumerate(steps):
            point = list(thresholds)
            point[i] += float(step)
            if not self._inside(i, point[i]):  # go the other way rather than leave the box
                point[i] = thresholds[i] - float(step)
            simplex.append(self.clip(point))
        return simplex

    def _start_phase(self, step: int) -> None:
        self.trainer.set_constraint_thresholds(self.clip(self.search.ask()))
        self.phase_start = step

    def on_train_begin(self, args, state, control, **kwargs):
        if self.trainer is None:
            raise RuntimeError(
                "ThresholdSearchCallback must be passed to a ConstrainedGRPOTrainer/ConstrainedRLOOTrainer"
            )
        if self.search is None:
            thresholds = self.trainer.multipliers.thresholds
            self.search = NelderMead(
                self._initial_simplex(thresholds), tol=self.tol, cache_tolerance=self.cache_tolerance
            )
            self._start_phase(state.global_step)
        max_steps = getattr(state, "max_steps", 0)
        if not self.done and max_steps and self.phase_start + self.phase_max_steps > max_steps:
            logger.warning(
                f"ThresholdSearchCallback: the current phase ends at step {self.phase_start + self.phase_max_steps} "
                f"(phase_max_steps={self.phase_max_steps}), after this run's max_steps={max_steps}: unless the "
                "constraints reach their thresholds sooner, no phase is scored and the thresholds stay as they are. "
                "Lower phase_max_steps or train longer."
            )

    def _reached(self) -> bool:
        values = self.trainer.constraint_values
        if values is None:
            return False
        thresholds = self.trainer.multipliers.thresholds
        return all(
            not math.isnan(v) and abs(v - t) <= self.reach_tolerance * max(abs(t), 1e-3)
            for v, t in zip(values, thresholds)
        )

    def _score(self) -> float:
        """``eval_fn(trainer)`` as a finite float; anything else is named (``trainer.evaluate()`` returns a dict).

        ``eval_fn`` runs on every process (it may evaluate, a collective); rank 0's value is broadcast first and
        checked on every process, so what the other ranks return is never checked and no rank raises alone (one
        rank raising before the broadcast left the others waiting in it)."""
        from accelerate.utils import broadcast_object_list

        value = self.eval_fn(self.trainer)
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            value = value.item()
        box = [value if self.trainer.is_world_process_zero() else None]
        broadcast_object_list(box, from_process=0)
        value = box[0]
        hint = "e.g. `lambda t: -t.evaluate()['eval_loss']` (higher is better)"
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(
                f"ThresholdSearchCallback: eval_fn must return one number, the score to maximise; got "
                f"{type(value).__name__} {str(value)[:80]}. {hint}."
            )
        if not math.isfinite(value):
            raise ValueError(
                f"ThresholdSearchCallback: eval_fn returned {value} at step {self.trainer.state.global_step}; the "
                f"search needs a finite score ({hint}). A diverged model gives NaN scores: check learning_rate."
            )
        return float(value)

    def on_step_end(self, args, state, control, **kwargs):
        if self.done or self.search is None:
            return
        if not self._reached() and state.global_step - self.phase_start < self.phase_max_steps:
            return
        score = self._score()
        self.search.tell(-score)
        self.phases += 1
        metrics = self.trainer._metrics["train"]
        metrics["threshold_search/score"].append(score)
        metrics["threshold_search/phases"] = [float(self.phases)]
        if self.search.converged or (self.max_phases is not None and self.phases >= self.max_phases):
            self.trainer.set_constraint_thresholds(self.clip(self.search.best[0]))
            self.done = True
        else:
            self._start_phase(state.global_step)

    def state_dict(self) -> dict[str, Any]:
        return {
            "search": None if self.search is None else self.search.state_dict(),
            "phase_start": self.phase_start,
            "phases": self.phases,
            "done": self.done,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.search = None if state.get("search") is None else NelderMead.from_state_dict(state["search"])
        self.phase_start, self.phases, self.done = int(state["phase_start"]), int(state["phases"]), bool(state["done"])
