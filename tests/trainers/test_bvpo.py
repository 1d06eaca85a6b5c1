"""BVPO (hfx.BVPOTrainer): the loss is α·DPO(trace) + (1 − α)·DPO(empty trace), α = 1 is DPO, the α* estimator,
training (full and LoRA), precomputed reference log-probs, checkpoint resume, the data helper, and clear errors."""

from __future__ import annotations

import json
import logging
import os

import pytest
import torch
from datasets import Dataset

import hfx
from hfx.compat import activation_checkpointing
from hfx.data import correctness_reward, preference_dataset
from hfx.testing import save_tiny_model
from hfx.trainers import AlphaEstimator, closed_form_alpha, make_bvpo_pairs

EMPTY = "<think>\n\n</think>\n\n"


@pytest.fixture(scope="module")
def model_path(tmp_path_factory) -> str:
    return save_tiny_model(tmp_path_factory.mktemp("bvpo") / "tiny", hidden_size=32)


@pytest.fixture(scope="module")
def tokenizer(model_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_path)


def config(tmp_path, cls=None, **kw):
    from trl import DPOConfig

    base = dict(
        output_dir=str(tmp_path / "out"),
        max_steps=3,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        logging_steps=1,
        report_to="none",
        use_cpu=True,
        bf16=False,
        **activation_checkpointing(False),
        save_strategy="no",
        seed=0,
        disable_tqdm=True,
    )
    base.update(kw)
    return (cls or hfx.BVPOConfig)(**base) if cls is not DPOConfig else DPOConfig(**base)


def perturb(model, scale: float = 0.2) -> None:
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen))


def strip_block(text: str) -> str:
    return text.split("</think>", 1)[1].lstrip() if text.lstrip().startswith("<think>\n\n</think>") else text


def views(ds: Dataset, suffix: str | None) -> tuple[Dataset, Dataset]:
    """The two DPO datasets BVPO mixes, built by hand (plain format)."""
    trace = ds.select_columns(["prompt", "chosen", "rejected"])
    if suffix is None:  # the empty block stays in the completions (built-in data)
        empty = {"prompt": ds["prompt"], "chosen": ds["chosen_no_trace"], "rejected": ds["rejected_no_trace"]}
    else:  # it moves into the prompt
        empty = {
            "prompt": [p + suffix for p in ds["prompt"]],
            "chosen": [strip_block(c) for c in ds["chosen_no_trace"]],
            "rejected": [strip_block(c) for c in ds["rejected_no_trace"]],
        }
    return trace, Dataset.from_dict(empty)


@pytest.mark.parametrize("suffix", [None, EMPTY], ids=["block-in-completion", "suffix"])
def test_loss_is_alpha_mix_of_two_dpo_losses(model_path, tokenizer, tmp_path, suffix):
    from trl import DPOConfig, DPOTrainer

    ds = preference_dataset(8, think=True)
    alpha = 0.3
    bvpo = hfx.BVPOTrainer(
        model_path, args=config(tmp_path, bvpo_alpha=alpha, no_trace_suffix=suffix), train_dataset=ds,
        processing_class=tokenizer,
    )  # fmt: skip
    trace, empty = views(ds, suffix)
    dpo_t = DPOTrainer(model_path, args=config(tmp_path, DPOConfig), train_dataset=trace, processing_class=tokenizer)
    dpo_e = DPOTrainer(model_path, args=config(tmp_path, DPOConfig), train_dataset=empty, processing_class=tokenizer)
    for trainer in (bvpo, dpo_t, dpo_e):  # the same policy ≠ reference in all three, so the losses are not log 2
        perturb(trainer.model)
    rows = range(4)
    batch = bvpo.data_collator([bvpo.train_dataset[i] for i in rows])
    with torch.no_grad():
        loss = bvpo.compute_loss(bvpo.model, batch)
        loss_t = dpo_t._compute_loss(dpo_t.model, dpo_t.data_collator([dpo_t.train_dataset[i] for i in rows]), False)
        loss_e = dpo_e._compute_loss(dpo_e.model, dpo_e.data_collator([dpo_e.train_dataset[i] for i in rows]), False)
        assert not torch.isclose(loss_t, loss_e)
        torch.testing.assert_close(loss, alpha * loss_t + (1 - alpha) * loss_e, rtol=0, atol=1e-6)
        bvpo.args.bvpo_alpha = 1.0  # α = 1: exactly DPO on the trace pairs
        assert torch.equal(bvpo.compute_loss(bvpo.model, batch), loss_t)
    # the logged metrics carry the view prefixes
    logged = bvpo._metrics["train" if bvpo.model.training else "eval"]
    assert {"trace/loss", "empty/loss", "trace/rewards/accuracies", "empty/logps/chosen", "bvpo/alpha"} <= set(logged)
    torch.testing.assert_close(logged["trace/loss"][0], loss_t.item())


def test_alpha_one_trains_exactly_like_dpo(model_path, tokenizer, tmp_path):
    from trl import DPOConfig, DPOTrainer

    ds = preference_dataset(12, think=True)
    bvpo = hfx.BVPOTrainer(
        model_path, args=config(tmp_path, bvpo_alpha=1.0), train_dataset=ds, processing_class=tokenizer
    )
    dpo = DPOTrainer(
        model_path, args=config(tmp_path, DPOConfig), train_dataset=views(ds, None)[0], processing_class=tokenizer
    )
    bvpo.train()
    dpo.train()
    a, b = bvpo.model.state_dict(), dpo.model.state_dict()
    assert any(not torch.equal(a[k], save) for k, save in _initial(model_path).items())
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)


def _initial(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path).state_dict()


def test_conversational_prompt_renders_thinking_off(model_path, tokenizer, tmp_path):
    ds = preference_dataset(4, think=True, format="conversational")
    trainer = hfx.BVPOTrainer(model_path, args=config(tmp_path), train_dataset=ds, processing_class=tokenizer)
    row, src = trainer.train_dataset[0], ds[0]
    off = tokenizer.apply_chat_template(
        src["prompt"], tokenize=False, add_generation_prompt=True, enable_thinking=False
    )
    assert off.endswith(EMPTY)  # the tiny template's enable_thinking=False
    assert row["empty_prompt_ids"] == tokenizer(off, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(row["empty_chosen_ids"]) == f"#### {src['answer']}<|im_end|>\n"  # block not doubled
    assert "<think>\n" in tokenizer.decode(row["chosen_ids"]) and "<think>" not in tokenizer.decode(row["prompt_ids"])


def test_auto_estimator_matches_closed_form_float64():
    gen = torch.Generator().manual_seed(0)
    dim, n = 6, 4000
    mu = torch.randn(dim, generator=gen, dtype=torch.float64)
    bias = torch.randn(dim, generator=gen, dtype=torch.float64)
    sd_t, sd_e, rho = 1.5, 0.4, 0.2  # trace: high variance; empty: low variance, biased; correlated noise
    z1 = torch.randn(n, dim, generator=gen, dtype=torch.float64)
    z2 = torch.randn(n, dim, generator=gen, dtype=torch.float64)
    g_t = mu + sd_t * z1
    g_e = mu + bias + sd_e * (rho * z1 + (1 - rho**2) ** 0.5 * z2)

    est = AlphaEstimator(decay=None, smoothing=0.0, warmup=1)
    for t, e in zip(g_t, g_e):
        est.update(t, e)
    # exactly the closed form on the sample moments (μ taken as the trace mean, as the estimator does)
    m_t, m_e = g_t.mean(0), g_e.mean(0)
    cov = lambda a, b: float(((a - a.mean(0)) * (b - b.mean(0))).sum(1).mean())  # noqa: E731
    exact = closed_form_alpha(cov(g_t, g_t), cov(g_e, g_e), cov(g_t, g_e), 0.0, m_e - m_t)
    assert est.alpha == pytest.approx(exact, abs=1e-10)
    # ...and close to the population α* of Thm 2 (known means and covariances)
    tr_t, tr_e, tr_te = dim * sd_t**2, dim * sd_e**2, dim * rho * sd_t * sd_e
    population = closed_form_alpha(tr_t, tr_e, tr_te, 0.0, bias)
    assert 0.0 < population < 1.0
    assert est.alpha == pytest.approx(population, abs=0.02)
    # unclipped formula vs brute-force minimisation of the MSE over α
    alphas = torch.linspace(-1, 2, 30001, dtype=torch.float64)
    mse = [float(((a * (g_t - m_t) + (1 - a) * (g_e - m_t)) ** 2).sum(1).mean()) for a in alphas[::100]]
    best = float(alphas[::100][int(torch.tensor(mse).argmin())])
    assert closed_form_alpha(cov(g_t, g_t), cov(g_e, g_e), cov(g_t, g_e), 0.0, m_e - m_t, clip=False) == pytest.approx(
        best, abs=0.011
    )
    # clipping, and the degenerate case
    assert closed_form_alpha(1.0, 5.0, 2.0) == 1.0 and closed_form_alpha(1.0, 5.0, 2.0, clip=False) == 1.5
    assert closed_form_alpha(5.0, 1.0, 2.0) == 0.0 and closed_form_alpha(1.0, 1.0, 0.0) == 0.5
    assert closed_form_alpha(0.0, 0.0, 0.0) is None


def test_closed_form_alpha_with_both_biases_minimises_the_mse():
    """Thm 2 with a biased trace estimator too (the trainer passes b_t = 0; hfx.closed_form_alpha takes both): the
    unclipped α* is the argmin over a fine grid of E||α g_t + (1-α) g_e - μ||² = α²(tr Σ_t + ||b_t||²) +
    (1-α)²(tr Σ_e + ||b_e||²) + 2α(1-α)(tr Σ_te + b_t·b_e)."""
    gen = torch.Generator().manual_seed(3)
    alphas = torch.linspace(-4, 5, 900001, dtype=torch.float64)
    for _ in range(4):
        b_t, b_e = (
            torch.randn(5, generator=gen, dtype=torch.float64),
            torch.randn(5, generator=gen, dtype=torch.float64),
        )
        tr_t, tr_e = 0.5 + 2 * float(torch.rand((), generator=gen, dtype=torch.float64)), 0.8
        tr_te = 0.3 * (tr_t * tr_e) ** 0.5
        mse = (
            alphas**2 * (tr_t + b_t @ b_t)
            + (1 - alphas) ** 2 * (tr_e + b_e @ b_e)
            + 2 * alphas * (1 - alphas) * (tr_te + b_t @ b_e)
        )
        best = float(alphas[int(mse.argmin())])
        assert -3.9 < best < 4.9  # an interior minimum of the grid
        assert closed_form_alpha(tr_t, tr_e, tr_te, b_t, b_e, clip=False) == pytest.approx(best, abs=2e-5)


def test_auto_estimator_skips_non_finite_observations(caplog):
    """One NaN/inf probe gradient used to enter the running sums: every later moment was NaN, estimate() returned
    None and α froze for the rest of training, silently. Now such a pair is skipped with a warning and the state is
    exactly that of an estimator which never saw it."""
    gen = torch.Generator().manual_seed(0)
    pairs = []
    for _ in range(12):
        g_t = torch.randn(20, generator=gen, dtype=torch.float64) + 1.0
        pairs.append((g_t, 0.3 * g_t + 0.1 * torch.randn(20, generator=gen, dtype=torch.float64) + 0.5))
    clean, poisoned = AlphaEstimator(warmup=3), AlphaEstimator(warmup=3)
    with caplog.at_level(logging.WARNING):
        for i, (g_t, g_e) in enumerate(pairs):
            clean.update(g_t, g_e)
            poisoned.update(g_t, g_e)
            if i == 5:
                nan_t, inf_e = g_t.clone(), g_e.clone()
                nan_t[0], inf_e[3] = float("nan"), float("inf")
                assert poisoned.update(nan_t, g_e) == clean.alpha
                assert poisoned.update(g_t, inf_e) == clean.alpha
    assert poisoned.alpha == clean.alpha and poisoned.last_estimate == clean.last_estimate
    assert poisoned.num_skipped == 2 and poisoned.num_updates == clean.num_updates == 12
    assert clean.alpha != AlphaEstimator(warmup=3).alpha  # α kept moving after the bad observations
    assert torch.equal(poisoned.sum_t, clean.sum_t) and (poisoned.sq_t, poisoned.sq_te) == (clean.sq_t, clean.sq_te)
    assert sum("non-finite gradient observation" in r.getMessage() for r in caplog.records) == 2
    scalars, tensors = poisoned.state_dict()
    restored = AlphaEstimator(warmup=3)
    restored.load_state_dict(json.loads(json.dumps(scalars)), tensors)
    assert restored.num_skipped == 2


def test_train_lora_auto_alpha_logged_every_step(model_path, tokenizer, tmp_path):
    from peft import LoraConfig

    ds = preference_dataset(16, think=True, format="conversational")
    args = config(tmp_path, bvpo_alpha="auto", bvpo_alpha_warmup_steps=2, **activation_checkpointing(True))
    trainer = hfx.BVPOTrainer(
        model_path, args=args, train_dataset=ds, processing_class=tokenizer,
        peft_config=LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"]),
    )  # fmt: skip
    assert trainer.ref_model is None  # the reference is the base model with the adapter disabled
    assert trainer._probe.names[-1].endswith("layers.1.mlp.down_proj")
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 3 and all("bvpo/alpha" in h and "trace/loss" in h and "empty/loss" in h for h in logs)
    assert logs[0]["bvpo/alpha"] == 0.5 and logs[-1]["bvpo/alpha"] != 0.5 and "bvpo/alpha_estimate" in logs[-1]
    assert 0.0 <= trainer.alpha <= 1.0 and trainer.alpha_estimator.num_updates == 3
    after = dict(trainer.model.named_parameters())
    assert before and all(not torch.equal(before[n], after[n]) for n in before if "lora_B" in n)


def test_auto_alpha_refuses_what_hides_the_activations_from_its_probe(model_path, tokenizer, tmp_path):
    """Reentrant checkpointing runs the probed layer under no_grad (α stayed at its initial value all run, with one
    warning); torch_compile=True gives the hooked activations no autograd path (the first step failed in the
    compiled backward). Both are errors naming the fix; a fixed α compiles."""
    ds = preference_dataset(8, think=True)
    on = activation_checkpointing(True)
    kwargs_name = next(iter(on)) + "_kwargs"  # activation_checkpointing_kwargs, gradient_ before transformers 5.23
    args = config(tmp_path, bvpo_alpha="auto", max_steps=1, **on, **{kwargs_name: {"use_reentrant": True}})
    trainer = hfx.BVPOTrainer(model_path, args=args, train_dataset=ds, processing_class=tokenizer)
    with pytest.raises(ValueError, match=r"reentrant gradient checkpointing.*\{'use_reentrant': False\}"):
        trainer.train()
    with pytest.raises(ValueError, match=r"torch_compile=True.*Use a fixed bvpo_alpha"):
        hfx.BVPOTrainer(model_path, args=config(tmp_path, bvpo_alpha="auto", torch_compile=True), train_dataset=ds,
                        processing_class=tokenizer)  # fmt: skip
    assert hfx.BVPOTrainer(model_path, args=config(tmp_path, bvpo_alpha=0.5, torch_compile=True), train_dataset=ds,
                           processing_class=tokenizer).alpha == 0.5  # fmt: skip


def test_auto_alpha_one_observation_per_optimizer_step(model_path, tokenizer, tmp_path):
    """With gradient accumulation α used to move between the micro-batches of one step (and the warm-up counted
    micro-batches). Now the estimator sees each step's gradient once, the mean over its micro-batches: batch 4 x 1
    and batch 2 x 2 accumulation steps give the same observations, the same α, and α is constant within a step."""
    ds = preference_dataset(16, think=True)
    kw = dict(bvpo_alpha="auto", bvpo_alpha_warmup_steps=1, max_steps=3)
    whole = hfx.BVPOTrainer(
        model_path, args=config(tmp_path / "a", **kw), train_dataset=ds, processing_class=tokenizer
    )
    whole.train()
    accum = hfx.BVPOTrainer(
        model_path, train_dataset=ds, processing_class=tokenizer,
        args=config(tmp_path / "b", per_device_train_batch_size=2, gradient_accumulation_steps=2, **kw),
    )  # fmt: skip
    seen = []
    original = accum.compute_loss

    def spy(*a, **k):
        seen.append((accum.state.global_step, accum.alpha))
        return original(*a, **k)

    accum.compute_loss = spy
    accum.train()
    assert accum.alpha_estimator.num_updates == whole.alpha_estimator.num_updates == 3
    assert len(seen) == 6 and all(seen[2 * i][1] == seen[2 * i + 1][1] for i in range(3))  # fixed within a step
    assert len({a for _, a in seen}) == 3  # and moved between steps
    torch.testing.assert_close(accum.alpha_estimator.sum_t, whole.alpha_estimator.sum_t, rtol=1e-4, atol=1e-7)
    assert accum.alpha == pytest.approx(whole.alpha, abs=1e-5)
    alphas = lambda t: [h["bvpo/alpha"] for h in t.state.log_history if "loss" in h]  # noqa: E731
    assert alphas(accum) == pytest.approx(alphas(whole), abs=1e-5)


def test_precompute_ref_log_probs_both_views(model_path, tokenizer, tmp_path):
    ds = preference_dataset(8, think=True)
    pre = hfx.BVPOTrainer(
        model_path, args=config(tmp_path, precompute_ref_log_probs=True), train_dataset=ds, processing_class=tokenizer
    )
    live = hfx.BVPOTrainer(model_path, args=config(tmp_path), train_dataset=ds, processing_class=tokenizer)
    cols = pre.train_dataset.column_names
    assert {"ref_chosen_logps", "ref_rejected_logps", "empty_ref_chosen_logps", "empty_ref_rejected_logps"} <= set(
        cols
    )
    assert pre.train_dataset[0]["ref_chosen_logps"] != pre.train_dataset[0]["empty_ref_chosen_logps"]
    rows = list(range(4))
    b_pre = pre.data_collator([pre.train_dataset[i] for i in rows])
    b_live = live.data_collator([live.train_dataset[i] for i in rows])
    assert "ref_chosen_logps" in b_pre["empty"]
    with torch.no_grad():
        torch.testing.assert_close(pre.compute_loss(pre.model, b_pre), live.compute_loss(live.model, b_live))
    pre.train()
    assert pre.state.global_step == 3


def test_resume_continues_with_same_alpha_state(model_path, tokenizer, tmp_path):
    ds = preference_dataset(24, think=True)
    kw = dict(bvpo_alpha="auto", bvpo_alpha_warmup_steps=1, max_steps=4, save_strategy="steps", save_steps=2)
    full = hfx.BVPOTrainer(model_path, args=config(tmp_path / "a", **kw), train_dataset=ds, processing_class=tokenizer)
    full.train()
    ckpt = tmp_path / "a" / "out" / "checkpoint-2"
    with open(ckpt / "bvpo_state.json") as f:
        saved = json.load(f)
    assert saved["bvpo_alpha"] == "auto" and saved["estimator"]["num_updates"] == 2
    assert os.path.isfile(ckpt / "bvpo_state.safetensors")

    resumed = hfx.BVPOTrainer(
        model_path, args=config(tmp_path / "b", **kw), train_dataset=ds, processing_class=tokenizer
    )
    resumed.train(resume_from_checkpoint=str(ckpt))
    logs = [h for h in resumed.state.log_history if "loss" in h and h["step"] > 2]  # 1-2 come from the checkpoint
    assert [h["step"] for h in logs] == [3, 4]
    full_logs = [h for h in full.state.log_history if "loss" in h and h["step"] > 2]
    assert [h["loss"] for h in logs] == pytest.approx([h["loss"] for h in full_logs], abs=1e-6)
    assert logs[0]["bvpo/alpha"] == pytest.approx(saved["alpha"], abs=1e-12)  # step 3 starts from the saved α
    assert resumed.alpha_estimator.num_updates == 4
    assert resumed.alpha == pytest.approx(full.alpha, abs=1e-5)
    torch.testing.assert_close(resumed.alpha_estimator.sum_t, full.alpha_estimator.sum_t, rtol=1e-4, atol=1e-6)
    # load_best_model_at_end: the best checkpoint's α state comes back with its weights (it kept step 4's)
    full.state.best_model_checkpoint = str(ckpt)
    full._load_best_model()
    assert full.alpha_estimator.num_updates == 2 and full.alpha == pytest.approx(saved["estimator"]["alpha"])


def test_resume_with_changed_estimator_settings_warns(model_path, tokenizer, tmp_path, caplog):
    """The saved decay / smoothing / warm-up / init used to be ignored without a word on load."""
    ds = preference_dataset(4, think=True)
    kw = dict(bvpo_alpha="auto", bvpo_alpha_stats_decay=0.95, bvpo_alpha_init=0.5)
    saved = hfx.BVPOTrainer(model_path, args=config(tmp_path, **kw), train_dataset=ds, processing_class=tokenizer)
    for _ in range(3):
        saved.alpha_estimator.update(torch.randn(8, dtype=torch.float64), torch.randn(8, dtype=torch.float64))
    saved.save_bvpo_state(str(tmp_path / "ckpt"))
    same = hfx.BVPOTrainer(model_path, args=config(tmp_path, **kw), train_dataset=ds, processing_class=tokenizer)
    with caplog.at_level(logging.WARNING):
        same.load_bvpo_state(str(tmp_path / "ckpt"))
    assert not [r for r in caplog.records if "estimator settings" in r.getMessage()]
    changed = hfx.BVPOTrainer(
        model_path, args=config(tmp_path, **{**kw, "bvpo_alpha_stats_decay": None, "bvpo_alpha_init": 0.2}),
        train_dataset=ds, processing_class=tokenizer,
    )  # fmt: skip
    with caplog.at_level(logging.WARNING):
        changed.load_bvpo_state(str(tmp_path / "ckpt"))
    (message,) = [r.getMessage() for r in caplog.records if "estimator settings" in r.getMessage()]
    assert "bvpo_alpha_stats_decay=None (checkpoint: 0.95)" in message and "bvpo_alpha_init=0.2" in message
    assert "no effect on resume" in message
    assert changed.alpha == saved.alpha and changed.alpha_estimator.num_updates == 3  # the state still loads


def test_missing_or_damaged_alpha_state_files_are_errors(model_path, tokenizer, tmp_path):
    """Without bvpo_state.safetensors the estimator restarted its gradient sums under the saved normaliser (α went
    0.457 -> 0.433, without a word); a damaged file was a bare JSONDecodeError / SafetensorError."""
    ds = preference_dataset(4, think=True)
    kw = dict(bvpo_alpha="auto")
    saved = hfx.BVPOTrainer(model_path, args=config(tmp_path, **kw), train_dataset=ds, processing_class=tokenizer)
    for _ in range(2):
        saved.alpha_estimator.update(torch.randn(8, dtype=torch.float64), torch.randn(8, dtype=torch.float64))
    ckpt = tmp_path / "ckpt"
    saved.save_bvpo_state(str(ckpt))
    fresh = lambda: hfx.BVPOTrainer(model_path, args=config(tmp_path, **kw), train_dataset=ds,  # noqa: E731
                                    processing_class=tokenizer)  # fmt: skip
    tensors = (ckpt / "bvpo_state.safetensors").read_bytes()
    (ckpt / "bvpo_state.safetensors").write_bytes(tensors[:20])
    with pytest.raises(ValueError, match=r"bvpo_state\.safetensors is damaged \(SafetensorError"):
        fresh().load_bvpo_state(str(ckpt))
    os.remove(ckpt / "bvpo_state.safetensors")
    with pytest.raises(FileNotFoundError, match=r"bvpo_state\.safetensors is missing: .* records 2 α-estimator"):
        fresh().load_bvpo_state(str(ckpt))
    (ckpt / "bvpo_state.json").write_text('{"bvpo_alpha": "au')
    with pytest.raises(ValueError, match=r"bvpo_state\.json is damaged \(JSONDecodeError"):
        fresh().load_bvpo_state(str(ckpt))
    # the estimator's file is optional before its first update (nothing to restore), as before
    unused = hfx.BVPOTrainer(model_path, args=config(tmp_path, **kw), train_dataset=ds, processing_class=tokenizer)
    unused.save_bvpo_state(str(tmp_path / "early"))
    assert not os.path.exists(tmp_path / "early" / "bvpo_state.safetensors")
    fresh().load_bvpo_state(str(tmp_path / "early"))


def test_make_bvpo_pairs_builds_trainable_data(model_path, tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_path)
    prompts = preference_dataset(3, think=True, format="conversational").select_columns(["prompt", "answer"])
    calls = []

    def reward(prompts, completions, answer, **kw):
        calls.append(len(completions))
        return [float(len(c[0]["content"]) % 7) for c in completions]  # varies, so best != worst

    pairs = make_bvpo_pairs(
        model, tokenizer, prompts, [reward, correctness_reward], n=3, max_new_tokens=6, drop_ties=False
    )
    assert len(pairs) == 3 and calls == [3] * 6
    assert {"prompt", "chosen", "rejected", "chosen_no_trace", "rejected_no_trace", "answer", "chosen_score"} <= set(
        pairs.column_names
    )
    row = pairs[0]
    assert row["chosen_score"] >= row["rejected_score"]
    assert row["chosen_no_trace"][0]["content"].startswith(EMPTY)  # self-describing: reasoning was off
    # a score is the sum over the reward functions
    one = dict(prompts=[row["prompt"]], answer=[row["answer"]])
    scored = {"chosen": "chosen_score", "rejected": "rejected_score", "chosen_no_trace": "chosen_no_trace_score"}
    for key, score in scored.items():
        total = reward(completions=[row[key]], **one)[0] + (
            correctness_reward(completions=[row[key]], **one)[0] or 0.0
        )
        assert row[score] == pytest.approx(total), key
    # drop_ties drops a prompt tied in either mode (here every no-trace sample scores the same)

    def flat_without_trace(prompts, completions, **kw):
        return [0.0 if c[0]["content"].startswith(EMPTY) else float(len(c[0]["content"]) % 7) for c in completions]

    kept = make_bvpo_pairs(model, tokenizer, prompts, [flat_without_trace], n=3, max_new_tokens=6, drop_ties=True)
    assert len(kept) == 0
    trainer = hfx.BVPOTrainer(
        model_path, args=config(tmp_path, max_steps=1, per_device_train_batch_size=3), train_dataset=pairs,
        processing_class=tokenizer,
    )  # fmt: skip
    assert "#### " not in tokenizer.decode(trainer.train_dataset[0]["empty_prompt_ids"])


def test_clear_errors(model_path, tokenizer, tmp_path):
    ds = preference_dataset(4, think=True)
    with pytest.raises(ValueError, match=r"missing: \['chosen_no_trace', 'rejected_no_trace'\]"):
        hfx.BVPOTrainer(
            model_path, args=config(tmp_path), train_dataset=preference_dataset(4), processing_class=tokenizer
        )
    # used to stop with a bare StopIteration inside TRL, and a TypeError deep in the no-trace rendering
    with pytest.raises(ValueError, match=r"train_dataset is empty \(0 rows\)"):
        hfx.BVPOTrainer(model_path, args=config(tmp_path), train_dataset=ds.select([]), processing_class=tokenizer)
    with pytest.raises(TypeError, match=r"column 'chosen_no_trace' of the train dataset must hold text .* holds int"):
        hfx.BVPOTrainer(model_path, args=config(tmp_path), processing_class=tokenizer,
                        train_dataset=ds.map(lambda r: {"chosen_no_trace": 3}))  # fmt: skip
    # every row is checked, not only the first: a None in row 2 used to raise AttributeError deep in tokenisation
    rows = ds.to_list()
    rows[2]["chosen_no_trace"] = None
    with pytest.raises(TypeError, match=r"column 'chosen_no_trace' of the train dataset .* row 2 holds NoneType"):
        hfx.BVPOTrainer(model_path, args=config(tmp_path), processing_class=tokenizer,
                        train_dataset=Dataset.from_list(rows))  # fmt: skip
    # row 0 decides that the no-trace completions carry the empty think block; a later row without it used to be
    # trained as an "empty-trace" pair with reasoning on, silently
    rows = ds.to_list()
    for column in ("chosen_no_trace", "rejected_no_trace"):
        rows[2][column] = strip_block(rows[2][column])
    with pytest.raises(
        ValueError, match=r"Row 2 of the train dataset: 'chosen_no_trace' does not start with an empty"
    ):
        hfx.BVPOTrainer(model_path, args=config(tmp_path), processing_class=tokenizer,
                        train_dataset=Dataset.from_list(rows))  # fmt: skip
    trainer = hfx.BVPOTrainer(model_path, args=config(tmp_path, no_trace_suffix=EMPTY), processing_class=tokenizer,
                              train_dataset=Dataset.from_list(rows))  # fmt: skip
    assert tokenizer.decode(trainer.train_dataset[2]["empty_prompt_ids"]).endswith(EMPTY)  # the suffix fixes it
    for bad in (1.5, -0.1, "often"):
        with pytest.raises(ValueError, match="bvpo_alpha"):
            hfx.BVPOConfig(output_dir=str(tmp_path), bvpo_alpha=bad, use_cpu=True)
    assert hfx.BVPOConfig(output_dir=str(tmp_path), bvpo_alpha="0.25", use_cpu=True).bvpo_alpha == 0.25

    # a chat template without enable_thinking, no suffix, completions without an empty block
    conv = preference_dataset(4, think=True, format="conversational")
    conv = conv.map(
        lambda r: {
            "chosen_no_trace": [{"role": "assistant", "content": strip_block(r["chosen_no_trace"][0]["content"])}],
            "rejected_no_trace": [{"role": "assistant", "content": strip_block(r["rejected_no_trace"][0]["content"])}],
        }
    )
    plain_template = tokenizer.chat_template.split("{%- if enable_thinking")[0] + "{%- endif %}"
    tok = type(tokenizer).from_pretrained(model_path)
    tok.chat_template = plain_template
    with pytest.raises(ValueError, match="no `enable_thinking` switch.*no_trace_suffix"):
        hfx.BVPOTrainer(model_path, args=config(tmp_path), train_dataset=conv, processing_class=tok)
    # ...which the empty-trace string fixes
    trainer = hfx.BVPOTrainer(
        model_path, args=config(tmp_path, no_trace_suffix=EMPTY), train_dataset=conv, processing_class=tok
    )
    assert tok.decode(trainer.train_dataset[0]["empty_prompt_ids"]).endswith(EMPTY)
    with pytest.raises(TypeError, match="BVPOConfig"):
        from trl import DPOConfig

        hfx.BVPOTrainer(model_path, args=config(tmp_path, DPOConfig), train_dataset=ds, processing_class=tokenizer)


def test_pushed_checkpoint_holds_the_alpha_state(model_path, tokenizer, tmp_path, fake_hub):
    """As for the JSON-state trainers: the α state is in the checkpoint folder when its Hub upload starts."""
    args = config(tmp_path, max_steps=1, save_strategy="steps", save_steps=1, push_to_hub=True,
                  hub_model_id="user/hfx-test", hub_strategy="checkpoint")  # fmt: skip
    ds = preference_dataset(8, think=True)
    trainer = hfx.BVPOTrainer(model_path, args=args, train_dataset=ds, processing_class=tokenizer)
    trainer.train()
    assert "bvpo_state.json" in fake_hub["last-checkpoint"]
    st = os.stat(os.path.join(args.output_dir, "checkpoint-1", "bvpo_state.json"))  # not rewritten during the upload
    assert fake_hub["last-checkpoint"]["bvpo_state.json"] == (st.st_ino, st.st_mtime_ns, st.st_size)
