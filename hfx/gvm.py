r"""GVM: variance-minimising per-prompt sample allocation (Yao et al., 2025, arXiv 2505.02391).

Rejection-sampling fine-tuning (RAFT) and GRPO spend the same number of samples on every prompt. GVM views the
chain of thought as a latent variable (EM: E-step = rejection sampling, M-step = fine-tuning) and spends the sample
budget where it lowers the variance of the gradient estimate most. With ``n_i`` samples on prompt ``i``, acceptance
rate ``p_i`` and per-sample gradient norm ``G_i``, the paper minimises the regularised variance bound (its Eq. 7)

    min_n  Σ_i  G_i² / (p_i n_i) · 1 / (1 + α / p_i^β)    subject to  Σ_i n_i = N,

whose solution is **Proposition 1**:

    n_i = N · w_i / Σ_l w_l,    w_i = G_i / √(p_i + α / p_i^(β−1)),    α = 1e-3, β = 2 by default.

Prompts never solved (``p_i = 0``) or with no gradient (``G_i = 0``) get nothing.

Pieces, usable separately:

- :func:`proposition1` (continuous allocation, Prop. 1, with optional lower bounds by water-filling),
  :func:`round_allocation` (integers that keep the sum), :func:`allocate_samples` (both, with the checks);
- :func:`embedding_grad_norms`: per-sample ``‖∇_E log P(y | x)‖₂`` of the input-embedding matrix ``E`` from **one**
  batched forward/backward. A forward hook makes the embedding output a leaf tensor; ``autograd.grad`` of the summed
  sequence log-likelihoods w.r.t. it gives every sample's own activation gradients (samples do not interact), and
  summing them per (sample, token id) gives each sample's gradient of ``E``. No per-sample backward passes, and no
  gradient w.r.t. parameters, which fails under real ZeRO-3 partitioning (activations are never sharded);
- :func:`pilot_statistics`: the estimators of Alg. 2 (``N'`` pilot samples per prompt; ``p_i`` = accepted fraction;
  ``G_i`` = mean gradient norm over the accepted samples), sharded over ranks and gathered so that every rank ends
  with the same statistics;
- :func:`allocate`: all of the above for a model, a tokenizer, a prompt dataset and TRL-style reward functions,
  returning a :class:`GVMAllocation` (JSON-serialisable, with :meth:`GVMAllocation.summary` for logging).

The trainers that consume the allocation are :class:`hfx.GVMRAFTTrainer` and :class:`hfx.GVMGRPOTrainer`.
"""

from __future__ import annotations

import inspect
import json
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch

__all__ = [
    "DEFAULT_ALPHA",
    "DEFAULT_BETA",
    "GVMAllocation",
    "allocate",
    "allocate_samples",
    "check_reward_columns",
    "embedding_grad_norms",
    "pilot_statistics",
    "proposition1",
    "proposition1_weights",
    "round_allocation",
    "uniform_allocation",
    "variance_objective",
]

#: Paper defaults of the regulariser in Eq. 7 / Proposition 1.
DEFAULT_ALPHA = 1e-3
DEFAULT_BETA = 2.0

# Arguments TRL passes to reward functions itself; everything else a reward function requires must be a column.
_TRL_REWARD_ARGS = {
    "prompts",
    "completions",
    "completion_ids",
    "trainer_state",
    "log_extra",
    "log_metric",
    "environments",
}
# Dataset columns TRL keeps back from reward functions, passing its own ``prompts`` / ``completions`` instead (it also
# keeps back a ``completion_ids`` column, but passes its own argument of that name)
_TRL_WITHHELD_COLUMNS = {"prompt": "prompts", "completion": "completions"}


# ----------------------------------------------------------------------------------------------------------------------
# Proposition 1 and rounding
# ----------------------------------------------------------------------------------------------------------------------
def proposition1_weights(
    p: Sequence[float], grad_norms: Sequence[float], alpha: float = DEFAULT_ALPHA, beta: float = DEFAULT_BETA
) -> list[float]:
    """``w_i = G_i / √(p_i + α / p_i^(β−1))`` (Prop. 1); ``0`` where ``p_i = 0`` or ``G_i = 0`` (float64)."""
    if not (0.0 <= alpha < math.inf and 0.0 <= beta < math.inf):  # as GVMGRPOConfig's gvm_alpha / gvm_beta
        raise ValueError(f"alpha and beta must be finite numbers >= 0, got alpha={alpha}, beta={beta}")
    out = []
    for pi, gi in zip(p, grad_norms, strict=True):
        pi, gi = float(pi), float(gi)
        if not (0.0 <= pi <= 1.0) or not math.isfinite(gi) or gi < 0.0:
            raise ValueError(f"need 0 <= p_i <= 1 and finite G_i >= 0, got p_i={pi}, G_i={gi}")
        out.append(0.0 if pi == 0.0 or gi == 0.0 else gi / math.sqrt(pi + alpha / pi ** (beta - 1.0)))
    return out


def variance_objective(
    n: Sequence[float],
    p: Sequence[float],
    grad_norms: Sequence[float],
    alpha: float = DEFAULT_ALPHA,
    beta: float = DEFAULT_BETA,
) -> float:
    """The regularised variance bound of Eq. 7, ``Σ_i G_i²/(p_i n_i) · 1/(1 + α/p_i^β)``, over prompts with a weight.

    Prompts with ``p_i = 0`` or ``G_i = 0`` contribute nothing (they get no samples); ``n_i = 0`` for any other
    prompt gives ``inf``.
    """
    total = 0.0
    for ni, pi, gi in zip(n, p, grad_norms, strict=True):
        if pi == 0.0 or gi == 0.0:
            continue
        if ni <= 0:
            return math.inf
        total += gi**2 / (pi * ni) / (1.0 + alpha / pi**beta)
    return total


def proposition1(
    p: Sequence[float],
    grad_norms: Sequence[float],
    budget: float,
    alpha: float = DEFAULT_ALPHA,
    beta: float = DEFAULT_BETA,
    min_per_prompt: float = 0.0,
) -> list[float]:
    """Continuous minimiser of Eq. 7 under ``Σ n_i = budget`` (Proposition 1), float64.

    With ``min_per_prompt = m > 0`` every prompt with a weight is held to ``n_i >= m``; the minimiser of this convex
    problem is ``n_i = max(m, λ w_i)`` (KKT), found by water-filling: prompts whose share falls below ``m`` are fixed
    at ``m`` and the rest of the budget is split by Prop. 1 again. Prompts without a weight get 0.
    """
    w = proposition1_weights(p, grad_norms, alpha, beta)
    active = [i for i, wi in enumerate(w) if wi > 0.0]
    if not active:
        raise ValueError("no prompt has p_i > 0 and G_i > 0: GVM has nothing to allocate samples to")
    if min_per_prompt * len(active) > budget:
        raise ValueError(
            f"budget {budget} is smaller than min_per_prompt ({min_per_prompt}) x the {len(active)} prompts with "
            "p_i > 0 and G_i > 0; raise the budget or lower the minimum"
        )
    top = max(w)
    w = [wi / top for wi in w]  # only the ratios matter; huge G_i would overflow their sum
    n = [0.0] * len(w)
    free = set(active)
    fixed_budget = 0.0
    while True:
        rest = budget - fixed_budget
        total = sum(w[i] for i in free)
        below = [i for i in free if rest * w[i] / total < min_per_prompt]
        if not below:
            for i in free:
                n[i] = rest * w[i] / total
            break
        for i in below:
            n[i] = float(min_per_prompt)
            fixed_budget += min_per_prompt
            free.discard(i)
        if not free:
            break
    return n


def round_allocation(n: Sequence[float], budget: int) -> list[int]:
    """Integers that sum to ``budget``: floor each ``n_i``, then give the missing units to the largest remainders.

    ``budget`` must be ``round(Σ n_i)``. Ties go to the lower index, so the result is deterministic. Zeros stay zero
    (a zero has no remainder), and a floor never falls below an integer lower bound the real values respect.
    """
    floors = [math.floor(x + 1e-9) for x in n]
    missing = int(budget) - sum(floors)
    if missing < 0 or missing > len(n):
        raise ValueError(f"cannot round allocations summing to {sum(n)} to a budget of {budget}")
    order = sorted(range(len(n)), key=lambda i: (-(n[i] - floors[i]), i))
    for i in order[:missing]:
        floors[i] += 1
    return floors


def allocate_samples(
    p: Sequence[float],
    grad_norms: Sequence[float],
    budget: int,
    alpha: float = DEFAULT_ALPHA,
    beta: float = DEFAULT_BETA,
    min_per_prompt: int = 0,
) -> list[int]:
    """Integer per-prompt sample counts: Proposition 1 (with the optional minimum), rounded to keep ``Σ n_i = budget``.

    Raises ``ValueError`` when no prompt has ``p_i > 0`` and ``G_i > 0``, or when ``budget`` is smaller than
    ``min_per_prompt`` times the number of such prompts.
    """
    if isinstance(budget, bool) or budget != int(budget) or budget < 0:  # 7.9 used to become 7, silently
        raise ValueError(f"budget must be a whole number >= 0, got {budget!r}")
    budget = int(budget)
    return round_allocation(proposition1(p, grad_norms, budget, alpha, beta, min_per_prompt), budget)


def uniform_allocation(num_prompts: int, budget: int) -> list[int]:
    """Plain RAFT / GRPO: the budget split evenly (the first ``budget mod num_prompts`` prompts get one more)."""
    if num_prompts < 1:
        raise ValueError(f"num_prompts must be >= 1, got {num_prompts}")
    base, extra = divmod(int(budget), num_prompts)
    return [base + (1 if i < extra else 0) for i in range(num_prompts)]


# ----------------------------------------------------------------------------------------------------------------------
# The allocation record
# ----------------------------------------------------------------------------------------------------------------------
@dataclass
class GVMAllocation:
    """One allocation round: the prompt pool (dataset indices), its statistics and the samples given to each prompt.

    ``n`` counts completions; ``p`` and ``G`` are ``None``-free floats (0 when unknown, e.g. for a uniform plan).
    ``iteration`` counts allocation rounds; ``start_step`` is the optimizer step at which the round began.
    """

    indices: list[int]
    p: list[float]
    G: list[float]
    n: list[int]
    budget: int
    iteration: int = 0
    start_step: int = 0
    uniform: bool = False
    alpha: float = DEFAULT_ALPHA
    beta: float = DEFAULT_BETA
    num_pilot: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> dict[str, float]:
        """Scalars for logging: mean p, fraction of prompts dropped (n = 0), allocated-samples histogram statistics."""
        n = torch.tensor(self.n, dtype=torch.float64)
        kept = n[n > 0]
        out = {
            "mean_p": float(torch.tensor(self.p, dtype=torch.float64).mean()) if self.p else 0.0,
            "frac_dropped": float((n == 0).double().mean()) if len(n) else 0.0,
            "n_mean": float(n.mean()) if len(n) else 0.0,
            "n_std": float(n.std(unbiased=False)) if len(n) else 0.0,
            "n_max": float(n.max()) if len(n) else 0.0,
            "n_min_kept": float(kept.min()) if len(kept) else 0.0,
            "n_median": float(n.median()) if len(n) else 0.0,
            "iteration": float(self.iteration),
        }
        return out

    def histogram(self, bins: int = 8) -> dict[str, list[float]]:
        """Counts of prompts per allocated-samples bin (``edges`` has ``bins + 1`` entries)."""
        n = torch.tensor(self.n, dtype=torch.float64)
        hi = float(n.max()) if len(n) and n.max() > 0 else 1.0
        counts = torch.histc(n, bins=bins, min=0.0, max=hi)
        return {"edges": torch.linspace(0.0, hi, bins + 1).tolist(), "counts": counts.tolist()}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GVMAllocation:
        """The record of :meth:`to_dict`; keys a newer hfx added are ignored (as in the other state files), and
        per-prompt lists of different lengths or counts that do not sum to ``budget`` are a ``ValueError``."""
        names = {f.name for f in fields(cls)}
        record = cls(**{k: v for k, v in data.items() if k in names})
        lengths = {key: len(getattr(record, key)) for key in ("indices", "p", "G", "n")}
        if len(set(lengths.values())) != 1 or sum(record.n) != record.budget:
            raise ValueError(
                f"GVM allocation record: per-prompt lists of lengths {lengths} and counts summing to {sum(record.n)} "
                f"for a budget of {record.budget}; the state file was edited or is damaged."
            )
        return record

    def save(self, path: str | os.PathLike[str]) -> None:
        with open(path, "w", encoding="utf-8") as f:
            json.dump(self.to_dict(), f, indent=2)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> GVMAllocation:
        with open(path, encoding="utf-8") as f:
            return cls.from_dict(json.load(f))


# ----------------------------------------------------------------------------------------------------------------------
# Per-sample embedding-gradient norms
# ----------------------------------------------------------------------------------------------------------------------
def embedding_grad_norms(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    loss_mask: torch.Tensor,
) -> torch.Tensor:
    r"""Per-sample ``‖∇_E Σ_{t ∈ completion} log P(x_t | x_{<t})‖₂`` for the input-embedding matrix ``E``, shape ``(B,)``.

    This is the paper's ``G`` statistic as the authors compute it (gradient of the ``embed_tokens`` parameter only,
    Alg. 2), for the input side of ``E``: with tied embeddings the parameter's full gradient also has an ``lm_head``
    part, which this does not include. How: the embedding output ``e`` is replaced (forward hook) by a leaf that
    requires grad; ``g = ∂(Σ_b log P_b)/∂e`` holds, in row ``b``, sample ``b``'s own gradient; and
    ``∇_E log P_b = Σ_t onehot(x_{b,t}) g_{b,t}ᵀ``, i.e. ``g_{b,t}`` summed over positions with the same token id.
    Parameters' ``.grad`` are untouched. Sequences should be right-padded (``attention_mask`` 0 on padding);
    ``loss_mask`` marks the completion tokens whose log-probabilities are summed (1 = in the sum).
    """
    embed = model.get_input_embeddings()
    captured: list[torch.Tensor] = []

    def hook(module, args, output):
        leaf = output.detach().requires_grad_(True)
        captured.append(leaf)
        return leaf

    handle = embed.register_forward_hook(hook)
    try:
        with torch.enable_grad():
            logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
            logits = logits[:, :-1]
            logps = torch.log_softmax(
                logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits, -1
            )
            targets = input_ids[:, 1:]
            token_logps = logps.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
            seq_logps = (token_logps * loss_mask[:, 1:].to(token_logps.dtype)).sum(-1)
            (grads,) = torch.autograd.grad(seq_logps.sum(), captured[0])
    finally:
        handle.remove()
    grads = grads.detach().to(torch.float64) * attention_mask.unsqueeze(-1).to(torch.float64)
    batch, _, hidden = grads.shape
    vocab = int(input_ids.max().item()) + 1
    keys = (torch.arange(batch, device=input_ids.device).unsqueeze(1) * vocab + input_ids).reshape(-1)
    keep = attention_mask.reshape(-1).bool()
    keys, flat = keys[keep], grads.reshape(-1, hidden)[keep]
    unique, inverse = torch.unique(keys, return_inverse=True)
    per_row = torch.zeros(len(unique), hidden, dtype=torch.float64, device=grads.device).index_add_(0, inverse, flat)
    sq = per_row.pow(2).sum(-1)
    per_sample = torch.zeros(batch, dtype=torch.float64, device=grads.device).index_add_(0, unique // vocab, sq)
    return per_sample.sqrt()


def _right_pad(prompt_ids: Sequence[Sequence[int]], completion_ids: Sequence[Sequence[int]], pad_id: int, device):
    seqs = [list(p) + list(c) for p, c in zip(prompt_ids, completion_ids, strict=True)]
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    attn = torch.zeros((len(seqs), width), dtype=torch.long)
    loss = torch.zeros((len(seqs), width), dtype=torch.long)
    for b, (p, c) in enumerate(zip(prompt_ids, completion_ids, strict=True)):
        ids[b, : len(p) + len(c)] = torch.tensor(list(p) + list(c), dtype=torch.long)
        attn[b, : len(p) + len(c)] = 1
        loss[b, len(p) : len(p) + len(c)] = 1
    return ids.to(device), attn.to(device), loss.to(device)


def sequence_grad_norms(
    model: torch.nn.Module,
    prompt_ids: Sequence[Sequence[int]],
    completion_ids: Sequence[Sequence[int]],
    pad_id: int,
    batch_size: int = 8,
) -> list[float]:
    """:func:`embedding_grad_norms` for token-id lists (right-padded in chunks of ``batch_size``); eval mode inside."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out: list[float] = []
    try:
        for s in range(0, len(prompt_ids), batch_size):
            ids, attn, loss = _right_pad(
                prompt_ids[s : s + batch_size], completion_ids[s : s + batch_size], pad_id, device
            )
            out.extend(embedding_grad_norms(model, ids, attn, loss).tolist())
    finally:
        model.train(was_training)
    return out


# ----------------------------------------------------------------------------------------------------------------------
# Pilot statistics (Alg. 2)
# ----------------------------------------------------------------------------------------------------------------------
def check_reward_columns(
    reward_funcs: Sequence[Any],
    columns: Sequence[str],
    *,
    dataset: str = "the prompt dataset",
    why: str = "GVM scores pilot samples with the run's reward functions",
) -> None:
    """Raise ``ValueError`` if a reward function requires an argument that is neither passed by TRL nor a column.

    E.g. :func:`hfx.data.correctness_reward` needs the ``answer`` column; without it every pilot sample would fail
    (or score as wrong), and GVM would silently drop every prompt. ``dataset`` and ``why`` word the error.
    """
    for func in reward_funcs:
        if isinstance(func, torch.nn.Module) or not callable(func):
            continue
        try:
            params = inspect.signature(func).parameters.values()
        except (TypeError, ValueError):
            continue
        name = getattr(func, "__name__", repr(func))
        for param in params:
            required = param.default is inspect.Parameter.empty and param.kind in (
                inspect.Parameter.POSITIONAL_OR_KEYWORD,
                inspect.Parameter.KEYWORD_ONLY,
            )
            if required and param.name in _TRL_WITHHELD_COLUMNS:
                raise ValueError(
                    f"reward function {name!r} requires a {param.name!r} argument, which TRL never passes (it keeps "
                    f"that column back and passes {_TRL_WITHHELD_COLUMNS[param.name]!r}); rename the parameter to "
                    f"{_TRL_WITHHELD_COLUMNS[param.name]!r}, or give it a default."
                )
            if required and param.name not in _TRL_REWARD_ARGS and param.name not in columns:
                raise ValueError(
                    f"reward function {name!r} needs a {param.name!r} column, which {dataset} lacks "
                    f"(columns: {sorted(columns)}); {why}. Add the column, or give the parameter a default."
                )


def _world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _all_gather_object(obj: Any) -> list[Any]:
    rank, world = _world()
    if world == 1:
        return [obj]
    out: list[Any] = [None] * world
    torch.distributed.all_gather_object(out, obj)
    return out


def pilot_statistics(
    rows: Sequence[dict[str, Any]],
    indices: Sequence[int],
    *,
    num_pilot: int,
    generate_fn: Callable[[list[dict[str, Any]]], tuple[list[list[int]], list[list[int]], list[Any]]],
    score_fn: Callable[[list[dict[str, Any]], list[Any], list[list[int]]], torch.Tensor],
    grad_fn: Callable[[list[list[int]], list[list[int]]], list[float]],
    accept_threshold: float = 1.0,
    prompts_per_batch: int = 4,
    show_progress: bool = True,
    gather: Callable[[Any], list[Any]] = _all_gather_object,
) -> tuple[list[float], list[float], dict[str, float]]:
    """Estimate ``p_i`` and ``G_i`` for every prompt of ``rows`` (Alg. 2), identical on every rank.

    Each rank takes the prompts ``rank, rank + world, …`` (padded with repeats so that every rank runs the same number
    of batches: the generation and scoring callbacks may be collective), draws ``num_pilot`` completions per prompt
    with ``generate_fn(rows) -> (prompt_ids, completion_ids, completions)`` (one row per completion), scores them with
    ``score_fn(rows, completions, completion_ids) -> (B,)`` rewards (NaN = unscorable), and computes gradient norms
    with ``grad_fn(prompt_ids, completion_ids)``. A sample is accepted when its reward is ``>= accept_threshold``.
    ``p_i`` = accepted / scored, ``G_i`` = mean norm over accepted samples (0 if none). Per-prompt results are
    gathered with ``gather`` (default: ``torch.distributed.all_gather_object``). Returns ``(p, G, info)``.
    """
    rank, world = _world()
    if len(rows) != len(indices):
        raise ValueError("rows and indices must have the same length")
    mine = list(range(rank, len(rows), world))
    per_rank = -(-len(rows) // world)
    padded = mine + [mine[-1] if mine else 0] * (per_rank - len(mine))
    local: dict[int, tuple[float, float, int, int]] = {}
    scored_total = 0
    batches = range(0, per_rank, prompts_per_batch)
    progress = None
    if show_progress and rank == 0:
        from tqdm.auto import tqdm

        progress = tqdm(total=per_rank * world, desc="GVM pilot sampling", unit="prompt")
    for start in batches:
        chunk = padded[start : start + prompts_per_batch]
        batch_rows = [dict(rows[j]) for j in chunk for _ in range(num_pilot)]
        prompt_ids, completion_ids, completions = generate_fn(batch_rows)
        rewards = torch.as_tensor(score_fn(batch_rows, completions, completion_ids), dtype=torch.float64).reshape(-1)
        norms = grad_fn(prompt_ids, completion_ids)
        for k, j in enumerate(chunk):
            if k + start >= len(mine):  # padding: computed for lock-step only
                continue
            r = rewards[k * num_pilot : (k + 1) * num_pilot]
            g = torch.as_tensor(norms[k * num_pilot : (k + 1) * num_pilot], dtype=torch.float64)
            scored = ~torch.isnan(r)
            accepted = scored & (r >= accept_threshold)
            n_scored, n_acc = int(scored.sum()), int(accepted.sum())
            scored_total += n_scored
            p = n_acc / n_scored if n_scored else 0.0
            G = float(g[accepted].mean()) if n_acc else 0.0
            local[j] = (p, G, n_scored, n_acc)
        if progress is not None:
            progress.update(len(chunk) * world)
    if progress is not None:
        progress.close()
    merged: dict[int, tuple[float, float, int, int]] = {}
    for part in gather(local):
        merged.update(part)
    if sum(v[2] for v in merged.values()) == 0:
        raise ValueError(
            "every reward function returned None for every pilot sample: GVM cannot estimate acceptance rates; "
            "check that the reward functions can score this dataset's completions"
        )
    p = [merged[j][0] for j in range(len(rows))]
    G = [merged[j][1] for j in range(len(rows))]
    info = {
        "pilot_samples": float(len(rows) * num_pilot),
        "pilot_scored": float(sum(v[2] for v in merged.values())),
        "pilot_accepted": float(sum(v[3] for v in merged.values())),
    }
    return p, G, info


# ----------------------------------------------------------------------------------------------------------------------
# Standalone entry point
# ----------------------------------------------------------------------------------------------------------------------
def _hf_generate_fn(model, tokenizer, max_new_tokens: int, temperature: float, prompt_column: str):
    from trl.data_utils import is_conversational

    def generate(rows):
        prompts = [r[prompt_column] for r in rows]
        if is_conversational({"prompt": prompts[0]}):
            texts = [tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True) for p in prompts]
        else:
            texts = prompts
        enc = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
        width = max(len(e) for e in enc)
        pad = tokenizer.pad_token_id
        ids = torch.tensor([[pad] * (width - len(e)) + e for e in enc])
        attn = torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e in enc])
        device = next(model.parameters()).device
        with torch.no_grad():
            out = model.generate(
                input_ids=ids.to(device),
                attention_mask=attn.to(device),
                max_new_tokens=max_new_tokens,
                do_sample=True,
                temperature=temperature,
                top_k=0,
                top_p=1.0,
                pad_token_id=pad,
            )
        eos = model.generation_config.eos_token_id
        eos = set(eos if isinstance(eos, list) else [eos]) | {tokenizer.eos_token_id}
        completion_ids = []
        for row in out[:, width:].tolist():
            cut = next((t + 1 for t, tok in enumerate(row) if tok in eos), len(row))
            completion_ids.append(row[:cut])
        completions = tokenizer.batch_decode(completion_ids, skip_special_tokens=True)
        if is_conversational({"prompt": prompts[0]}):
            completions = [[{"role": "assistant", "content": c}] for c in completions]
        return enc, completion_ids, completions

    return generate


def _callable_score_fn(reward_funcs, reward_weights, prompt_column: str):
    def score(rows, completions, completion_ids):
        columns = {k: [r[k] for r in rows] for k in rows[0] if k not in ("prompt", "completion", "completion_ids")}
        prompts = [r[prompt_column] for r in rows]
        per_func = []
        for func in reward_funcs:
            out = func(prompts=prompts, completions=completions, completion_ids=completion_ids, **columns)
            per_func.append([math.nan if v is None else float(v) for v in out])
        table = torch.tensor(per_func, dtype=torch.float64).T  # (B, K)
        weights = torch.tensor(reward_weights, dtype=torch.float64)
        total = (table * weights).nansum(-1)
        total[torch.isnan(table).all(-1)] = math.nan
        return total

    return score


def allocate(
    model: torch.nn.Module,
    tokenizer: Any,
    dataset: Any,
    reward_funcs: Callable | Sequence[Callable],
    *,
    budget: int | None = None,
    num_pilot: int = 8,
    alpha: float = DEFAULT_ALPHA,
    beta: float = DEFAULT_BETA,
    min_per_prompt: int = 0,
    reward_weights: Sequence[float] | None = None,
    accept_threshold: float = 1.0,
    max_new_tokens: int = 64,
    temperature: float = 1.0,
    prompts_per_batch: int = 4,
    grad_batch_size: int = 8,
    prompt_column: str = "prompt",
    show_progress: bool = True,
) -> GVMAllocation:
    """GVM allocation for ``dataset`` (prompt column + the reward functions' columns): pilot, statistics, Prop. 1.

    ``budget`` (total completions to draw for the M-step) defaults to ``num_pilot × len(dataset)``, the paper's
    ``N = N'·n``. Reward functions use TRL's signature; a sample's reward is their ``reward_weights``-weighted sum
    and it is accepted when that is ``>= accept_threshold``. Under ``torch.distributed`` the pilot work is sharded
    over ranks and every rank returns the same allocation. See the module docstring for the method.
    """
    funcs = [reward_funcs] if callable(reward_funcs) else list(reward_funcs)
    columns = list(dataset.column_names) if hasattr(dataset, "column_names") else list(dataset[0])
    if prompt_column not in columns:
        raise ValueError(f"the dataset has no {prompt_column!r} column (columns: {sorted(columns)})")
    check_reward_columns(funcs, columns)
    weights = list(reward_weights) if reward_weights is not None else [1.0] * len(funcs)
    rows = [dataset[i] for i in range(len(dataset))]
    if tokenizer.pad_token_id is None:
        raise ValueError("the tokenizer needs a pad token")
    p, G, info = pilot_statistics(
        rows,
        list(range(len(rows))),
        num_pilot=num_pilot,
        generate_fn=_hf_generate_fn(model, tokenizer, max_new_tokens, temperature, prompt_column),
        score_fn=_callable_score_fn(funcs, weights, prompt_column),
        grad_fn=lambda pi, ci: sequence_grad_norms(model, pi, ci, tokenizer.pad_token_id, grad_batch_size),
        accept_threshold=accept_threshold,
        prompts_per_batch=prompts_per_batch,
        show_progress=show_progress,
    )
    budget = num_pilot * len(rows) if budget is None else int(budget)
    n = allocate_samples(p, G, budget, alpha, beta, min_per_prompt)
    return GVMAllocation(
        indices=list(range(len(rows))),
        p=p,
        G=G,
        n=n,
        budget=budget,
        alpha=alpha,
        beta=beta,
        num_pilot=num_pilot,
        extra=info,
    )
