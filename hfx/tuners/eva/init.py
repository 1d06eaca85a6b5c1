"""EVA's data-driven step, run by ``hfx.initialize``: principal components of layer inputs, rank redistribution.

Statistics. For each target layer hfx keeps the token count n, the mean and the d x d scatter matrix
M = sum_t (x_t - mean)(x_t - mean)^T of its input activations x_t (only real tokens: ``attention_mask`` and, with
``use_label_mask``, ``labels != label_mask_value``); with ``center=False`` the uncentred Gram matrix sum_t x_t x_t^T.
Each batch's statistics are merged into the running ones with Chan's pairwise update, which is exact: after any number
of batches, the eigenvectors of M are the right-singular vectors of the stacked (centred) activations seen so far
(the components), its eigenvalues their squared singular values. Unlike an incremental *truncated* SVD (PEFT's
IncrementalPCA), nothing is approximated, and the statistics are mergeable.

Multi-process. Every process feeds its own batches; per batch, the counts and sums are all-reduced, then each
process's scatter about the global batch mean (its own scatter plus n_r (mean_r - mean)(mean_r - mean)^T) is
all-reduced. That is the scatter of the union of the processes' batches, so N processes compute what one process does
on the concatenated batches; only d x d statistics cross processes, never activations. Decisions (convergence, ranks)
and the final components are broadcast from rank 0 so all processes run the same number of forwards and end with
identical adapters.

Convergence (the paper's test). After every batch, each open layer's top components are recomputed; component i has
converged when |cos(v_i(t), v_i(t-1))| >= tau. A layer is done (it stops collecting) when the components its current
rank needs have all converged; a later redistribution that gives it more re-opens it. The loop ends when every layer
is done or after ``max_iterations`` batches (a warning names the unconverged layers), or when a one-shot iterator
runs out.

Rank redistribution. Layer l may take up to k_l = round(r_l * rho) components; the explained-variance ratios
lambda_i / trace(M) of all layers' candidate components are pooled, and the budget R = sum r_l (or ``rank_budget``)
goes to the R largest (after ``min_rank`` per layer). Layers that receive identical inputs (q/k/v, gate/up) share one
set of statistics (found by fingerprinting the first batch); ties between them go to the layer that comes first.

ZeRO-3. The base is only read through forward passes: when its parameters are partitioned (``zero.Init``) and no
DeepSpeed engine exists yet, each module's own parameters are gathered in a forward pre-hook and released after its
forward, so at most one module's full weights are materialised at a time. The LoRA modules are then rebuilt at their
new ranks with plain ``update_layer`` (they are created after ``zero.Init`` and are not partitioned); the DeepSpeed
engine the Trainer builds later partitions them.
"""

from __future__ import annotations

import inspect
import re
import time
import warnings
from collections.abc import Iterable, Iterator, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from hfx.initialize import mark_initialized
from hfx.tuners._batches import BUILD_UNLABELLED_BATCHES, check_batch

from .config import EvaConfig

_EIGH_MAX_DIM = 2048


def _is_distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _is_main() -> bool:
    return not _is_distributed() or torch.distributed.get_rank() == 0


def _comm_device(t: torch.Tensor) -> torch.device:
    """NCCL only moves accelerator tensors; gloo takes anything."""
    if torch.distributed.get_backend() == "nccl" and t.device.type != "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return t.device


def _all_reduce(t: torch.Tensor, op=None) -> torch.Tensor:
    """In-place sum (or ``op``) over processes; returns ``t``."""
    if _is_distributed():
        buf = t.to(_comm_device(t))
        torch.distributed.all_reduce(buf, op=op or torch.distributed.ReduceOp.SUM)
        if buf is not t:
            t.copy_(buf)
    return t


def _broadcast(t: torch.Tensor) -> torch.Tensor:
    """In place: rank 0's values on every process; returns ``t``."""
    if _is_distributed():
        buf = t.to(_comm_device(t))
        torch.distributed.broadcast(buf, 0)
        if buf is not t:
            t.copy_(buf)
    return t


# --------------------------------------------------------------------------------------------------------------------
# statistics and their eigen-decomposition


@dataclass
class LayerStats:
    """Running statistics and current components of one layer input (shared by layers with identical inputs)."""

    dim: int
    k: int  # candidate components
    center: bool
    n: float = 0.0
    mean: torch.Tensor | None = None
    scatter: torch.Tensor | None = None
    components: torch.Tensor | None = None  # (k, dim), rows
    eigvals: torch.Tensor | None = None  # (k,), of the scatter: squared singular values of the stacked activations
    ratios: torch.Tensor | None = None  # (k,), explained-variance ratios
    converged: torch.Tensor | None = None  # (k,) bool
    pending: tuple | None = field(default=None, repr=False)  # this batch's local (n, mean, scatter)

    def add_local(self, x: torch.Tensor) -> None:
        """Local statistics of this batch's tokens ``x`` (n_b x d), kept until ``merge``."""
        n_b = x.shape[0]
        if self.center:
            mean_b = x.mean(0) if n_b else x.new_zeros(x.shape[1])
            xc = x - mean_b
            m_b = xc.T @ xc
        else:
            mean_b = x.new_zeros(x.shape[1])
            m_b = x.T @ x
        if self.pending is not None:  # the layer ran twice in one forward: merge both calls
            n_b, mean_b, m_b = _chan(*self.pending, n_b, mean_b, m_b, self.center)
        self.pending = (float(n_b), mean_b, m_b)

    def merge(self, dtype: torch.dtype, device: torch.device, stats_device: torch.device | None) -> None:
        """All-reduce this batch's statistics over processes and merge them into the running ones (Chan et al.)."""
        if self.pending is None:
            n_b, mean_b, m_b = 0.0, None, None
        else:
            n_b, mean_b, m_b = self.pending
        self.pending = None
        if mean_b is None:
            mean_b = torch.zeros(self.dim, dtype=dtype, device=device)
            m_b = torch.zeros(self.dim, self.dim, dtype=dtype, device=device)
        head = torch.cat([torch.tensor([n_b], dtype=dtype, device=mean_b.device), mean_b * n_b])
        _all_reduce(head)
        n_tot = float(head[0])
        if n_tot == 0:
            return
        mean_tot = head[1:] / n_tot
        if self.center and _is_distributed():
            delta = mean_b - mean_tot
            m_b = m_b + n_b * torch.outer(delta, delta)
        _all_reduce(m_b)
        if stats_device is not None:
            mean_tot, m_b = mean_tot.to(stats_device), m_b.to(stats_device)
        if self.scatter is None:
            self.n, self.mean, self.scatter = n_tot, mean_tot, m_b
        else:
            self.n, self.mean, self.scatter = _chan(self.n, self.mean, self.scatter, n_tot, mean_tot, m_b, self.center)

    def solve(self, solver: str, tau: float) -> None:
        """Recompute the top-k components; mark those within ``tau`` cosine of the previous iteration's."""
        prev = self.components
        comps, vals = _top_eigvecs(self.scatter, self.k, solver, prev)
        trace = torch.diagonal(self.scatter).sum()
        self.ratios = vals / trace if trace > 0 else torch.zeros_like(vals)
        self.eigvals = vals
        self.components = comps
        if prev is None:
            self.converged = torch.zeros(self.k, dtype=torch.bool)
        else:
            cos = (comps * prev).sum(1).abs() / (comps.norm(dim=1) * prev.norm(dim=1)).clamp_min(1e-30)
            self.converged = (cos >= tau).cpu()


def _chan(n_a, mean_a, m_a, n_b, mean_b, m_b, center: bool):
    """Merge (count, mean, scatter) of two disjoint sets of tokens (Chan, Golub & LeVeque); Gram: just add."""
    n = n_a + n_b
    if not center:
        return n, mean_a, m_a + m_b
    if n_a == 0:
        return n_b, mean_b, m_b
    if n_b == 0:
        return n_a, mean_a, m_a
    delta = mean_b - mean_a
    m = m_a + m_b + (n_a * n_b / n) * torch.outer(delta, delta)
    return n, mean_a + delta * (n_b / n), m


def _canonical_signs(v: torch.Tensor) -> torch.Tensor:
    """Flip each row so that its largest-magnitude entry is positive (sklearn's svd_flip on V^T)."""
    idx = v.abs().argmax(dim=1, keepdim=True)
    signs = torch.sign(v.gather(1, idx))
    signs[signs == 0] = 1
    return v * signs


def _top_eigvecs(
    scatter: torch.Tensor, k: int, solver: str, prev: torch.Tensor | None, niter: int = 4
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k eigenvectors (rows, canonical signs) and eigenvalues (descending, >= 0) of the symmetric ``scatter``."""
    d = scatter.shape[0]
    if solver == "auto":
        solver = "eigh" if d <= _EIGH_MAX_DIM else "subspace"
    if solver == "eigh" or k >= d // 2:
        vals, vecs = torch.linalg.eigh(scatter)
        vals, vecs = vals.flip(0)[:k], vecs.flip(1)[:, :k]
    else:
        # Block power iteration warm-started from the previous components, then Rayleigh-Ritz.
        q = min(d, 2 * k + 8)
        gen = torch.Generator(device="cpu").manual_seed(0)
        basis = torch.randn(d, q, generator=gen, dtype=scatter.dtype).to(scatter.device)
        if prev is not None:
            basis[:, : prev.shape[0]] = prev.T.to(scatter.dtype)
        basis = torch.linalg.qr(basis).Q
        for _ in range(niter):
            basis = torch.linalg.qr(scatter @ basis).Q
        vals, small = torch.linalg.eigh(basis.T @ scatter @ basis)
        vals, vecs = vals.flip(0)[:k], (basis @ small.flip(1))[:, :k]
    return _canonical_signs(vecs.T.contiguous()), vals.clamp_min(0)


# A component explaining less than this fraction of its layer's variance is a direction the inputs do not span (an
# arbitrary null-space eigenvector, at float32 round-off): a LoRA rank on it would never train, since A·x = 0.
NULL_RATIO = 1e-6


def redistribute_ranks(ratios: list[torch.Tensor], budget: int, min_rank: int = 0) -> list[int]:
    """Ranks per layer: each layer's first ``min_rank`` components, then the ``budget`` rest to the largest
    explained-variance ratios pooled over all layers (ties: earlier layer first). ``ratios[l]`` holds layer l's
    candidate components' ratios (descending), so layer l gets between ``min_rank`` and ``len(ratios[l])``.
    Components below ``NULL_RATIO`` get no budget beyond ``min_rank``: the ranks then sum to less than ``budget``."""
    if budget < min_rank * len(ratios):
        raise ValueError(
            f"EVA: the rank budget {budget} is smaller than min_rank={min_rank} times the number of target layers "
            f"({len(ratios)}); raise r / rank_budget, lower min_rank, or target fewer layers."
        )
    ranks = [min(min_rank, len(r)) for r in ratios]
    rest = budget - sum(ranks)
    values, owners = [], []
    for i, r in enumerate(ratios):
        values.append(r[ranks[i] :].double().cpu())
        owners.append(torch.full((len(r) - ranks[i],), i, dtype=torch.long))
    if rest > 0 and values:
        values_t, owners_t = torch.cat(values), torch.cat(owners)
        order = torch.sort(values_t, descending=True, stable=True).indices[:rest]
        order = order[values_t[order] >= NULL_RATIO]
        for i in owners_t[order].tolist():
            ranks[i] += 1
    return ranks


# --------------------------------------------------------------------------------------------------------------------
# model plumbing


def target_layers(peft_model: nn.Module, adapter_name: str) -> list[tuple[str, nn.Module]]:
    """``(name, lora_layer)`` for each LoRA Linear/Conv1D layer carrying ``adapter_name``."""
    from peft.tuners.lora import LoraLayer

    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover
        Conv1D = nn.Linear  # noqa: N806
    layers = []
    for name, module in peft_model.named_modules():
        # a LoRA Embedding keeps its adapter in lora_embedding_A: it carries the adapter too, and must get the error
        if not isinstance(module, LoraLayer) or (
            adapter_name not in module.lora_A and adapter_name not in getattr(module, "lora_embedding_A", {})
        ):
            continue
        if not isinstance(module.get_base_layer(), (nn.Linear, Conv1D)) and not hasattr(module, "in_features"):
            raise TypeError(
                f"EVA supports Linear/Conv1D targets; {name!r} is {type(module.get_base_layer()).__name__}."
            )
        if adapter_name not in module.lora_A or not isinstance(module.lora_A[adapter_name], nn.Linear):
            raise TypeError(
                f"EVA supports Linear/Conv1D targets; {name!r} ({type(module).__name__}) is not one. Exclude it from "
                "target_modules."
            )
        layers.append((name, module))
    if not layers:
        raise ValueError(f"EVA: adapter {adapter_name!r} has no LoRA layers to initialise.")
    return layers


def _forward_params(peft_model: nn.Module) -> set[str] | None:
    try:
        params = inspect.signature(peft_model.get_base_model().forward).parameters
    except (TypeError, ValueError, AttributeError):  # pragma: no cover
        return None
    names = {n for n, p in params.items() if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}
    return names or None


def _check_batch(batch: Any, forward_params: set[str] | None) -> Mapping[str, Any]:
    hint = "'input_ids' (with 'attention_mask', and 'labels' for the label mask)"
    return check_batch(batch, forward_params, "EVA", hint, build_hint=BUILD_UNLABELLED_BATCHES)


def token_mask(batch: Mapping[str, Any], config: EvaConfig) -> torch.Tensor | None:
    """Boolean mask of the tokens EVA uses: ``attention_mask`` and (``use_label_mask``) labels != ignore index.
    ``None``: every token (no 2-D attention mask and no labels)."""
    mask = None
    am = batch.get("attention_mask")
    if isinstance(am, torch.Tensor) and am.dim() == 2:
        mask = am.bool()
    labels = batch.get("labels")
    if config.use_label_mask and isinstance(labels, torch.Tensor) and labels.dim() == 2:
        lm = labels != config.label_mask_value
        mask = lm if mask is None else mask & lm.to(mask.device)
    return mask


def _select_tokens(x: torch.Tensor, mask: torch.Tensor | None, name: str) -> torch.Tensor:
    x = x.reshape(-1, x.shape[-1])
    if mask is None:
        return x
    if mask.numel() != x.shape[0]:
        raise ValueError(
            f"EVA: the input of {name!r} has {x.shape[0]} token positions but the batch's token mask has "
            f"{mask.numel()}; EVA needs layers whose input is laid out like the batch (batch, seq, features)."
        )
    return x[mask.reshape(-1).to(x.device)]


def _exclusion_keys(bad: list[str], good: list[str]) -> list[str] | None:
    """For each module name in ``bad``, its shortest dotted suffix that PEFT's ``exclude_modules`` matching (the
    name itself, or ending in ``.suffix``) applies to no name in ``good``: the keys that leave out exactly ``bad``.
    ``None`` when some name has none (it is itself a suffix of a good name)."""

    def matches(key: str, name: str) -> bool:
        return name == key or name.endswith("." + key)

    keys = []
    for name in bad:
        parts = name.split(".")
        candidates = (".".join(parts[-n:]) for n in range(1, len(parts) + 1))
        key = next((k for k in candidates if not any(matches(k, g) for g in good)), None)
        if key is None:
            return None
        if key not in keys:
            keys.append(key)
    return keys


def _check_positions(positions: Mapping[str, int], expected: int) -> None:
    """Every target layer sees one input row per token of the batch (what the token mask selects from); a pooler or
    classification head (one vector per sample, which ``'all-linear'`` also selects) does not: all are named."""
    bad = sorted(n for n, p in positions.items() if p != expected)
    if not bad:
        return
    base = [n.removeprefix("base_model.model.") for n in positions]  # the names exclude_modules is matched against
    bad_base = [n.removeprefix("base_model.model.") for n in bad]
    keys = _exclusion_keys(bad_base, [n for n in base if n not in bad_base])
    fix = (
        f"Leave it out with exclude_modules={keys}, or list the token layers in target_modules."
        if keys is not None and len(keys) <= 6
        else "List only the token layers in target_modules (or exclude these with an exclude_modules regex)."
    )
    shown = bad if len(bad) <= 6 else bad[:6] + [f"... ({len(bad)} in all)"]
    raise ValueError(
        f"EVA: the inputs of {shown} have {sorted({positions[n] for n in bad})} rows, not one per token of the "
        f"batch ({expected}), so the token mask cannot pick their real tokens: such a layer (e.g. a pooler or "
        "classification head, which target_modules='all-linear' also selects, or a vision tower's) does not see "
        f"the batch's tokens. {fix}"
    )


def _fingerprint(x: torch.Tensor) -> torch.Tensor:
    """A cheap, order-sensitive signature of a tensor: identical inputs (q/k/v, gate/up) give identical ones."""
    flat = x.detach().reshape(-1).double()
    w = torch.sin(torch.arange(flat.numel(), dtype=torch.float64, device=flat.device) * 12.9898)
    return torch.stack([torch.tensor(float(flat.numel()), dtype=torch.float64, device=flat.device),
                        flat.sum(), (flat * flat).sum(), (flat * w).sum()]).cpu()  # fmt: skip


@contextmanager
def zero3_gather_per_module(model: nn.Module):
    """While active, each module's own ZeRO-3 partitioned parameters are gathered for its forward and released after
    (what DeepSpeed's engine does, for a model that has no engine yet). A no-op without partitioned parameters."""
    mods = [m for m in model.modules() if any(hasattr(p, "ds_id") for p in m.parameters(recurse=False))]
    if not mods:
        yield
        return
    import deepspeed

    open_ctx: dict[int, list] = {}

    def pre(module, args):
        ctx = deepspeed.zero.GatheredParameters(
            [p for p in module.parameters(recurse=False) if hasattr(p, "ds_id")], modifier_rank=None
        )
        ctx.__enter__()
        open_ctx.setdefault(id(module), []).append(ctx)

    def post(module, args, output):
        stack = open_ctx.get(id(module))
        if stack:
            stack.pop().__exit__(None, None, None)

    handles = []
    for m in mods:
        handles.append(m.register_forward_pre_hook(pre))
        handles.append(m.register_forward_hook(post))
    try:
        yield
    finally:
        for h in handles:
            h.remove()
        for stack in open_ctx.values():
            while stack:
                stack.pop().__exit__(None, None, None)


def _batch_stream(batches: Iterable, passes: list[int]) -> Iterator:
    """The batches, cycled while the iterable can be re-iterated (DataLoader, list); once for an iterator.
    ``passes[0]`` counts the completed passes: after the first, tokens repeat."""
    reiterable = iter(batches) is not batches
    while True:
        empty = True
        for b in batches:
            empty = False
            yield b
        passes[0] += 1
        if empty or not reiterable:
            return


def _next_batch(stream: Iterator) -> Any:
    """Next batch, or None when this process's batches ran out on *any* process (so that all stop together)."""
    batch = next(stream, None)
    flag = torch.tensor([0.0 if batch is None else 1.0])
    if _is_distributed():
        _all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
    return batch if flag.item() > 0 else None


def _to_device(batch: Mapping[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


# --------------------------------------------------------------------------------------------------------------------
# the init


def compute_eva(
    peft_model: nn.Module,
    batches: Iterable[Mapping[str, Any]],
    adapter_name: str = "default",
    *,
    show_progress: bool = True,
) -> dict[str, Any]:
    """Run EVA's statistics loop; returns ``{"components": {name: A (rank x d)}, "ranks": ..., ...}`` (no model change)."""
    config = peft_model.peft_config[adapter_name]
    base = peft_model.get_base_model() if hasattr(peft_model, "get_base_model") else peft_model
    if getattr(getattr(base, "config", None), "is_encoder_decoder", False):
        raise NotImplementedError(
            f"EVA: {type(base).__name__} is an encoder-decoder model. EVA keeps the real tokens of the batch "
            "(attention_mask, and labels != -100), but there they belong to two sequences, the encoder's inputs and "
            "the decoder's targets, so one token mask cannot serve both stacks. hfx's EVA supports decoder-only and "
            "encoder-only models; for this one use hfx.LoraGAConfig or PEFT's LoraConfig."
        )
    layers = target_layers(peft_model, adapter_name)
    names = [n for n, _ in layers]
    configured = {n: m.r[adapter_name] for n, m in layers}
    dims = {n: m.in_features for n, m in layers}
    k = {n: max(1, min(dims[n], round(configured[n] * config.rho))) for n in names}
    budget = config.rank_budget if config.rank_budget is not None else sum(configured.values())
    if budget < config.min_rank * len(names):
        redistribute_ranks([torch.zeros(0)] * len(names), budget, config.min_rank)  # raises the budget error
    too_small = [n for n in names if k[n] < config.min_rank]
    if too_small:
        raise ValueError(f"EVA: min_rank={config.min_rank} exceeds round(r * rho) or in_features of {too_small}.")
    forward_params = _forward_params(peft_model)
    device = next(iter(peft_model.parameters())).device
    stats_device = torch.device(config.stats_device) if config.stats_device is not None else None
    if stats_device is not None and stats_device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"EvaConfig.stats_device={config.stats_device!r}, but CUDA is not available here; leave it None (the "
            "activations' device) or set 'cpu'."
        )
    passes = [0]
    stream = _batch_stream(batches, passes)
    distinct: dict[str, float] | None = None  # tokens per leader after one full pass, once the batches cycle
    start = time.perf_counter()

    # "finite": per layer of this batch, a 0-dim bool tensor (no host sync in the hook); checked once per batch
    state: dict[str, Any] = {"mask": None, "mode": "fingerprint", "finite": {}}
    prints: dict[str, torch.Tensor] = {}
    positions: dict[str, int] = {}  # token positions of each layer's input in the first batch
    leader_of: dict[str, str] = {}
    stats: dict[str, LayerStats] = {}
    open_layers: set[str] = set()
    dtypes: dict[str, torch.dtype] = {}

    def make_hook(name: str):
        def hook(module, args):
            x = args[0] if args else None
            if not isinstance(x, torch.Tensor):
                return
            if state["mode"] == "fingerprint":
                prints[name] = _fingerprint(x)
                positions[name] = x.numel() // max(1, x.shape[-1])
                dtypes[name] = torch.float64 if x.dtype == torch.float64 else torch.float32
                return
            if name not in open_layers:
                return
            with torch.no_grad():
                tokens = _select_tokens(x.detach(), state["mask"], name).to(dtypes[name])
                finite = torch.isfinite(tokens).all()
                previous = state["finite"].get(name)
                state["finite"][name] = finite if previous is None else previous & finite
                stats[name].add_local(tokens)

        return hook

    was_training = peft_model.training
    progress = None
    handles = []
    iteration = 0
    hit_cap = ran_out = False
    try:
        peft_model.eval()
        with ExitStack() as stack, torch.no_grad():
            if hasattr(peft_model, "disable_adapter"):
                stack.enter_context(peft_model.disable_adapter())
            stack.enter_context(zero3_gather_per_module(peft_model))
            for name, layer in layers:
                handles.append(layer.register_forward_pre_hook(make_hook(name)))

            batch = _next_batch(stream)
            if batch is None:
                raise ValueError("EVA: no batches to compute activation statistics from (the dataloader is empty).")
            batch = _check_batch(batch, forward_params)
            peft_model(**_to_device(batch, device))

            # layers with identical inputs share statistics (decided on fingerprints summed over processes)
            missing = [n for n in names if n not in prints]
            if missing:
                raise RuntimeError(f"EVA: target layers {missing} did not run in the model's forward.")
            first_mask = token_mask(batch, config)
            if first_mask is not None:
                _check_positions(positions, first_mask.numel())
            table = _all_reduce(torch.stack([prints[n] for n in names]))
            first: dict[tuple, str] = {}
            for i, n in enumerate(names):
                key = (dims[n], *table[i].tolist())
                leader_of[n] = first.setdefault(key, n)
            leaders = [n for n in names if leader_of[n] == n]
            for lead in leaders:
                group_k = max(k[m] for m in names if leader_of[m] == lead)
                stats[lead] = LayerStats(dim=dims[lead], k=group_k, center=config.center)
            for n in names:
                k[n] = stats[leader_of[n]].k
            open_layers.update(leaders)
            state["mode"] = "stats"
            ranks = dict(k)  # before all layers have components, each needs all its candidates

            if show_progress and _is_main():
                from tqdm.auto import tqdm

                progress = tqdm(total=config.max_iterations, desc="EVA", leave=False)
            while batch is not None:
                state["mask"] = token_mask(batch, config)
                state["finite"] = {}
                peft_model(**_to_device(batch, device))
                _check_finite(state["finite"], iteration)
                for lead in leaders:
                    if lead in open_layers:
                        stats[lead].merge(dtypes[lead], device, stats_device)
                iteration += 1
                for lead in leaders:
                    s = stats[lead]
                    if lead in open_layers and s.n > s.k:
                        s.solve(config.solver, config.tau)
                if all(stats[lead].components is not None for lead in leaders):
                    ranks = dict(
                        zip(
                            names,
                            redistribute_ranks(
                                [stats[leader_of[n]].ratios[: k[n]] for n in names], budget, config.min_rank
                            ),
                        )  # fmt: skip
                    )
                # a leader needs the largest rank of its group; decisions come from rank 0
                need = {lead: max(ranks[m] for m in names if leader_of[m] == lead) for lead in leaders}
                done = torch.tensor(
                    [
                        stats[lead].converged is not None and bool(stats[lead].converged[: need[lead]].all())
                        for lead in leaders
                    ],
                    dtype=torch.float64,
                )
                _broadcast(done)
                open_layers.clear()
                open_layers.update(lead for lead, d in zip(leaders, done.tolist()) if not d)
                if progress is not None:
                    progress.update(1)
                    progress.set_postfix_str(f"{len(leaders) - len(open_layers)}/{len(leaders)} converged")
                if not open_layers:
                    break
                if iteration >= config.max_iterations:
                    hit_cap = True
                    break
                batch = _next_batch(stream)
                if batch is None:
                    ran_out = True
                    break
                if passes[0] and distinct is None:  # the batches start again: more of them add no new tokens
                    distinct = {lead: stats[lead].n for lead in leaders}
                    _refuse_too_few_tokens(stats, leaders)
                batch = _check_batch(batch, forward_params)
    finally:
        for h in handles:
            h.remove()
        peft_model.train(was_training)
        if progress is not None:
            progress.close()

    if distinct is None:
        _refuse_too_few_tokens(stats, leaders)
    flat = [n for n in names if not float(torch.diagonal(stats[leader_of[n]].scatter).sum()) > 0]
    if flat:
        what = "every token gives the same input" if config.center else "every input is zero"
        raise ValueError(
            f"EVA: the inputs of target layer(s) {flat[:8]}{' ...' if len(flat) > 8 else ''} have no variance over "
            f"the tokens seen ({what}), so they have no principal directions to initialise lora_A with; leave them "
            "out (exclude_modules) or feed batches whose tokens differ."
        )
    unconverged = sorted(n for n in names if leader_of[n] in open_layers)
    if unconverged:
        why = f"after max_iterations={config.max_iterations}" if hit_cap else "when the batches ran out"
        if not (hit_cap or ran_out):  # pragma: no cover
            why = "at the end"
        warnings.warn(
            f"EVA: {len(unconverged)} layers had not converged (tau={config.tau}) {why}; they use the components of "
            f"the last iteration: {unconverged[:8]}{' ...' if len(unconverged) > 8 else ''}",
            stacklevel=3,
        )
    rank_t = _broadcast(torch.tensor([ranks[n] for n in names], dtype=torch.float64))
    ranks = dict(zip(names, (int(v) for v in rank_t.tolist())))
    unused = min(budget, sum(k.values())) - sum(ranks.values())  # beyond the candidates: the cap, as before
    if unused > 0:
        warnings.warn(
            f"EVA: {unused} of the rank budget {budget} are not used: the remaining candidate "
            f"components explain less than {NULL_RATIO:g} of their layer's variance (the inputs span fewer directions "
            "than r * rho), and a LoRA rank on such a direction would never train. Feed more varied batches, or "
            "raise rho for more candidates per layer.",
            stacklevel=3,
        )
    components: dict[str, torch.Tensor] = {}
    explained: dict[str, float] = {}
    for n in names:
        s = stats[leader_of[n]]
        a = s.components[: ranks[n]].clone()
        if config.whiten:
            # PEFT's and the original's whitening: divide by sqrt(singular value) = eigenvalue ** (1/4)
            # (floored relative to the layer's largest: a min_rank component on a null direction is not blown up)
            floor = max(float(s.eigvals[0]) * NULL_RATIO, 1e-30)
            a = a / s.eigvals[: ranks[n]].clamp_min(floor).pow(0.25).unsqueeze(1).to(a.dtype)
        components[n] = _broadcast(a.contiguous())
        explained[n] = float(s.ratios[: ranks[n]].sum())
    return {
        "components": components,
        "ranks": ranks,
        "configured": configured,
        "explained": explained,
        "iterations": iteration,
        "converged": not unconverged,
        "unconverged": unconverged,
        "tokens": max((distinct or {n: stats[n].n for n in leaders}).values()),  # distinct: one pass at most
        "groups": {lead: [m for m in names if leader_of[m] == lead] for lead in leaders},
        "budget": budget,
        "time_s": time.perf_counter() - start,
    }


def _refuse_too_few_tokens(stats: Mapping[str, LayerStats], leaders: list[str]) -> None:
    no_components = [n for n in leaders if stats[n].components is None]
    if no_components:
        raise ValueError(
            f"EVA: too few valid tokens for layers {no_components} (seen {[stats[n].n for n in no_components]}, need "
            f"more than {[stats[n].k for n in no_components]}); feed more batches or lower r / rho (masked tokens "
            "do not count)."
        )


def _check_finite(finite: Mapping[str, torch.Tensor], batch_index: int) -> None:
    """Raise, on every process at once, when a layer saw non-finite inputs in this batch: one inf/NaN token makes the
    scatter matrix NaN for good (Chan's merge carries it), and EVA would then hand out rank 0 / NaN components."""
    names = sorted(finite)
    ok = torch.stack([finite[n].cpu() for n in names]).tolist() if names else []  # layers may sit on several devices
    bad_here = [n for n, good in zip(names, ok) if not good]
    any_bad = torch.tensor([1.0 if bad_here else 0.0], dtype=torch.float64)
    if _is_distributed():
        _all_reduce(any_bad, op=torch.distributed.ReduceOp.MAX)
    if any_bad.item() == 0:
        return
    where = (
        f"the inputs of {len(bad_here)} target layer(s), first {bad_here[0]!r},"
        if bad_here
        else "a target layer's inputs on another process"
    )
    raise ValueError(
        f"EVA: {where} contain non-finite values (inf/NaN) in batch {batch_index} (0-based, counting the batches "
        "hfx.initialize read); they would make the layer's activation statistics NaN (rank 0, NaN lora_A). Check "
        "that batch's inputs, and the model's dtype: fp16 activations overflow (run hfx.initialize on a bf16/fp32 "
        "model)."
    )


def _base_name(name: str) -> str:
    return name.removeprefix("base_model.model.")


def apply_eva(peft_model: nn.Module, result: Mapping[str, Any], adapter_name: str = "default") -> None:
    """Resize each LoRA layer to its EVA rank, set A to the components and B to 0 (rank 0: remove the adapter);
    rewrite ``rank_pattern``/``alpha_pattern`` (and ``exclude_modules`` for removed layers) so the saved config
    rebuilds exactly these shapes."""
    from peft.utils.other import get_pattern_key

    config = peft_model.peft_config[adapter_name]
    layers = target_layers(peft_model, adapter_name)
    for name, _ in layers:  # refuse before changing anything: NaN components would make the model output NaN
        comps = result["components"].get(name)
        if result["ranks"][name] == 0:
            continue
        if comps is None:
            raise ValueError(
                f"EVA: the result has no components for layer {name!r} (rank {result['ranks'][name]}); nothing was "
                "applied. Pass the result of compute_eva for this model and adapter."
            )
        if not bool(torch.isfinite(comps).all()):
            raise ValueError(
                f"EVA: the components for layer {name!r} are not finite (its activation statistics saw inf/NaN "
                "inputs); nothing was applied. Check the batches and the model's dtype (fp16 overflows), then run "
                "compute_eva again."
            )
    build_cfg = config.to_lora_config()
    build_cfg.init_lora_weights = False
    rank_pattern: dict[str, int] = {}
    alpha_pattern: dict[str, float] = {}
    removed: list[str] = []
    for name, layer in layers:
        base_name = _base_name(name)
        rank = result["ranks"][name]
        r_conf = result["configured"][name]
        alpha = config.alpha_pattern.get(get_pattern_key(config.alpha_pattern.keys(), base_name), config.lora_alpha)
        if rank == 0:
            _remove_adapter_from_layer(peft_model, name, layer, adapter_name)
            removed.append(base_name)
            continue
        if config.adjust_scaling_factors and rank != r_conf:
            alpha = alpha * rank / r_conf
        old_a = layer.lora_A[adapter_name].weight
        dtype, device = old_a.dtype, old_a.device
        layer.update_layer(adapter_name=adapter_name, r=rank, lora_alpha=alpha, config=build_cfg)
        lora_a, lora_b = layer.lora_A[adapter_name], layer.lora_B[adapter_name]
        lora_a.to(device=device, dtype=dtype)
        lora_b.to(device=device, dtype=dtype)
        with torch.no_grad():
            lora_a.weight.copy_(result["components"][name].to(device=device, dtype=dtype))
            lora_b.weight.zero_()
            if lora_b.bias is not None:
                lora_b.bias.zero_()
        if rank != config.r:
            rank_pattern[base_name] = rank
        if alpha != config.lora_alpha:
            alpha_pattern[base_name] = alpha
    config.rank_pattern = rank_pattern
    config.alpha_pattern = alpha_pattern
    if removed:
        ex = config.exclude_modules
        if isinstance(ex, str):
            config.exclude_modules = "|".join([f"(?:{ex})"] + [re.escape(n) for n in removed])
        else:
            config.exclude_modules = set(ex or ()) | set(removed)
    if _is_distributed():  # nothing above is random, but make sure every process ends identical
        for _, layer in target_layers(peft_model, adapter_name):
            _broadcast(layer.lora_A[adapter_name].weight.data)
    mark_initialized(config)


def _remove_adapter_from_layer(peft_model: nn.Module, name: str, layer: nn.Module, adapter_name: str) -> None:
    """EVA gave this layer rank 0: put the base layer back, or, where other adapters live on the layer too, remove
    only this adapter's weights (swapping the layer out dropped theirs silently), keeping their active state."""
    from peft.utils.other import _get_submodules

    others = [a for a in layer.lora_A if a != adapter_name]
    if not others:
        parent, _, target_name = _get_submodules(peft_model, name)
        setattr(parent, target_name, layer.get_base_layer())
        return
    still_active = [a for a in layer.active_adapters if a != adapter_name]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT's "setting active adapter to ..." (restored right below)
        layer.delete_adapter(adapter_name)
    layer.set_adapter(still_active)


def read_saved_eva(path: str, peft_model: nn.Module, adapter_name: str = "default") -> dict[str, Any]:
    """The ranks and A/B of each target layer from an EVA adapter saved by ``save_pretrained`` (or a Trainer
    checkpoint) of this model; a target layer without weights there was removed by EVA (rank 0)."""
    from peft.utils import load_peft_weights

    try:
        state: dict[str, torch.Tensor] = load_peft_weights(path, device="cpu")
    except (OSError, ValueError) as err:
        raise ValueError(
            f"EVA init_from={path!r}: no saved adapter weights there ({err}). Pass the directory that "
            "save_pretrained or the Trainer wrote (it holds adapter_model.safetensors)."
        ) from err
    layers = target_layers(peft_model, adapter_name)
    names = {n for n, _ in layers}
    saved = {k.removesuffix(".lora_A.weight") for k in state if k.endswith(".lora_A.weight")}
    unknown = sorted(saved - names)
    if unknown or not saved:
        what = f"has LoRA weights for {unknown[:3]}, which" if unknown else "has no LoRA weights for any layer that"
        raise ValueError(
            f"EVA init_from={path!r} {what} adapter {adapter_name!r} of this model does not target "
            f"(it targets e.g. {sorted(names)[:3]}). Build the model with the EvaConfig of the run that saved it."
        )
    ranks, components, b = {}, {}, {}
    for name, layer in layers:
        if name not in saved:
            ranks[name] = 0
            continue
        a_w, b_w = state[f"{name}.lora_A.weight"], state.get(f"{name}.lora_B.weight")
        if (
            a_w.dim() != 2
            or a_w.shape[1] != layer.in_features
            or b_w is None
            or b_w.shape != (layer.out_features, a_w.shape[0])
        ):
            raise ValueError(
                f"EVA init_from={path!r}: the saved weights of {name!r} have shapes {tuple(a_w.shape)} / "
                f"{None if b_w is None else tuple(b_w.shape)}; this layer needs A (rank, {layer.in_features}) and B "
                f"({layer.out_features}, rank). Was it saved from another model?"
            )
        ranks[name], components[name], b[name] = a_w.shape[0], a_w, (b_w, state.get(f"{name}.lora_B.bias"))
    configured = {n: m.r[adapter_name] for n, m in layers}
    config = peft_model.peft_config[adapter_name]
    budget = config.rank_budget if config.rank_budget is not None else sum(configured.values())
    caps = {n: max(1, min(m.in_features, round(configured[n] * config.rho))) for n, m in layers}
    over = [n for n in ranks if ranks[n] > caps[n]]
    if sum(ranks.values()) > budget or over:
        raise ValueError(
            f"EVA init_from={path!r}: the saved ranks (sum {sum(ranks.values())}"
            + (f"; {over[0]!r} has {ranks[over[0]]} > round(r * rho) = {caps[over[0]]}" if over else "")
            + f") do not fit this EvaConfig (rank budget {budget}). Was the adapter saved with another EvaConfig, or "
            "by another method (a LoRA-GA export has rank 2r everywhere)? Build the model with the config of the "
            "run that saved it."
        )
    return {"ranks": ranks, "configured": configured, "components": components, "lora_B": b}


def initialize_eva(
    peft_model: nn.Module,
    batches: Iterable[Mapping[str, Any]],
    adapter_name: str = "default",
    *,
    show_progress: bool = True,
    init_from: str | None = None,
) -> dict[str, Any]:
    """``hfx.initialize`` for an ``EvaConfig`` adapter: statistics loop, rank redistribution, A/B; returns a summary
    (``ranks``, ``explained_variance`` per layer and mean, ``iterations``, ``converged``, ``tokens``, ``time_s``).

    ``init_from``: a directory saved by ``save_pretrained`` (or a Trainer checkpoint) of this model's EVA adapter;
    take its ranks and A/B instead of running the statistics (no batches needed): the way to rebuild the training
    state before ``trainer.train(resume_from_checkpoint=...)`` without a second pass over the data.
    """
    config = peft_model.peft_config[adapter_name]
    if not isinstance(config, EvaConfig):
        raise TypeError(f"adapter {adapter_name!r} is not an EvaConfig adapter.")
    if getattr(config, "_eva_done", False):
        raise RuntimeError(f"EVA: adapter {adapter_name!r} is already initialised; build the model again to re-run.")
    if init_from is not None:
        return _initialize_from_saved(peft_model, init_from, adapter_name, config, show_progress)
    result = compute_eva(peft_model, batches, adapter_name, show_progress=show_progress)
    apply_eva(peft_model, result, adapter_name)  # marks the adapter initialised
    config._eva_done = True
    ranks = result["ranks"]
    explained = result["explained"]
    kept = [v for n, v in explained.items() if ranks[n] > 0]
    summary = {
        "method": "eva",
        "layers": len(ranks),
        "ranks": {_base_name(n): r for n, r in ranks.items()},
        "rank_budget": result["budget"],
        "removed_layers": sum(r == 0 for r in ranks.values()),
        "explained_variance": {_base_name(n): round(v, 6) for n, v in explained.items()},
        "mean_explained_variance": sum(kept) / len(kept) if kept else 0.0,
        "iterations": result["iterations"],
        "converged": result["converged"],
        "unconverged_layers": [_base_name(n) for n in result["unconverged"]],
        "shared_input_groups": sum(len(g) > 1 for g in result["groups"].values()),
        "tokens": int(result["tokens"]),
        "time_s": round(result["time_s"], 3),
    }
    if show_progress and _is_main():
        values = list(ranks.values())
        print(
            f"EVA[{adapter_name}]: {len(values)} layers, ranks {min(values)}..{max(values)} (budget {result['budget']}"
            f", {summary['removed_layers']} removed), explained variance {summary['mean_explained_variance']:.1%} "
            f"(mean), {result['iterations']} iterations ({'converged' if result['converged'] else 'NOT converged'}), "
            f"{summary['tokens']} tokens, {result['time_s']:.2f}s"
        )
    return summary


def _initialize_from_saved(
    peft_model: nn.Module, path: str, adapter_name: str, config: EvaConfig, show_progress: bool
) -> dict[str, Any]:
    start = time.perf_counter()
    result = read_saved_eva(path, peft_model, adapter_name)
    layers = dict(target_layers(peft_model, adapter_name))
    apply_eva(peft_model, result, adapter_name)  # the same shapes, scalings and config patterns as the saving run
    with torch.no_grad():
        for name, (b_w, b_bias) in result["lora_B"].items():
            lora_b = layers[name].lora_B[adapter_name]
            lora_b.weight.copy_(b_w.to(device=lora_b.weight.device, dtype=lora_b.weight.dtype))
            if b_bias is not None and lora_b.bias is not None:
                lora_b.bias.copy_(b_bias.to(device=lora_b.bias.device, dtype=lora_b.bias.dtype))
    config._eva_done = True
    ranks = result["ranks"]
    summary = {
        "method": "eva",
        "layers": len(ranks),
        "ranks": {_base_name(n): r for n, r in ranks.items()},
        "removed_layers": sum(r == 0 for r in ranks.values()),
        "init_from": path,
        "batches": 0,
        "time_s": round(time.perf_counter() - start, 3),
    }
    if show_progress and _is_main():
        kept = [r for r in ranks.values() if r > 0]
        print(
            f"EVA[{adapter_name}]: {len(ranks)} layers, ranks {min(kept)}..{max(kept)} "
            f"({summary['removed_layers']} removed) and weights read from {path}"
        )
    return summary


__all__ = [
    "LayerStats",
    "apply_eva",
    "compute_eva",
    "initialize_eva",
    "read_saved_eva",
    "redistribute_ranks",
    "target_layers",
    "token_mask",
    "zero3_gather_per_module",
]
