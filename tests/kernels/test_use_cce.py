"""``hfx.use_cce``: the patched causal-LM forward gives the model's own loss (and gradients) without logits, and a
few-step training run with it matches the run without it step for step (Trainer, TRL SFTTrainer, DPOTrainer)."""

from __future__ import annotations

import types

import pytest
import torch

import hfx
from hfx.testing import build_tokenizer, tiny_causal_lm


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


def batch(tokenizer, n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, len(tokenizer), (n, 11), generator=g)
    mask = torch.ones_like(ids)
    mask[0, -3:] = 0  # padding
    labels = ids.masked_fill(mask == 0, -100)
    labels[1, :4] = -100  # a prompt
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("num_items", [None, 13])
def test_forward_matches_model_loss(tokenizer, tied, num_items):
    inputs = batch(tokenizer)
    kwargs = {} if num_items is None else {"num_items_in_batch": torch.tensor(num_items)}
    ref = tiny_causal_lm(hidden_size=32, tie_word_embeddings=tied).train()
    out_ref = ref(**inputs, **kwargs)
    out_ref.loss.backward()
    model = hfx.use_cce(tiny_causal_lm(hidden_size=32, tie_word_embeddings=tied).train())
    assert hfx.cce_enabled(model)
    out = model(**inputs, **kwargs)
    assert out.logits is None
    torch.testing.assert_close(out.loss, out_ref.loss, atol=1e-6, rtol=1e-6)
    out.loss.backward()
    g_ref, g = grads(ref), grads(model)
    assert g.keys() == g_ref.keys()
    for k in g:
        torch.testing.assert_close(g[k], g_ref[k], atol=1e-6, rtol=1e-5, msg=k)


def test_logits_kept_outside_training_and_without_labels(tokenizer):
    inputs = batch(tokenizer)
    model = hfx.use_cce(tiny_causal_lm(hidden_size=32))
    model.eval()
    out = model(**inputs)
    assert out.logits is not None and out.loss is not None
    model.train()
    out = model(input_ids=inputs["input_ids"])
    assert out.logits is not None and out.loss is None
    # generate still works (signature kept)
    model.eval()
    model.generate(inputs["input_ids"][:1, :4], max_new_tokens=2, do_sample=False)


def test_logits_to_keep_takes_the_plain_forward_and_a_second_call_updates_the_options(tokenizer):
    """In training, a forward asking for logits (logits_to_keep != 0) runs the model's own forward, logits and all;
    calling use_cce again changes its options (here z_loss), as documented."""
    inputs = batch(tokenizer)
    ref = tiny_causal_lm(hidden_size=32).train()
    model = hfx.use_cce(tiny_causal_lm(hidden_size=32)).train()
    keep = inputs["input_ids"].shape[1]  # every position, so the model's own loss runs too
    kept, want = model(**inputs, logits_to_keep=keep), ref(**inputs, logits_to_keep=keep)
    assert kept.logits is not None
    torch.testing.assert_close(kept.logits, want.logits, rtol=0, atol=0)
    torch.testing.assert_close(kept.loss, want.loss, rtol=0, atol=0)
    plain_loss = model(**inputs).loss
    hfx.use_cce(model, z_loss=0.1)
    with_z = model(**inputs).loss
    assert with_z > plain_loss + 1e-3  # z_loss adds 0.1 * mean(lse^2) > 0


def test_undo_restores_plain_forward(tokenizer):
    inputs = batch(tokenizer)
    model = hfx.use_cce(tiny_causal_lm(hidden_size=32)).train()
    assert model(**inputs).logits is None
    hfx.use_cce(model, enabled=False)
    assert not hfx.cce_enabled(model)
    assert "forward" not in vars(model) and "forward" not in vars(model.lm_head)
    assert model(**inputs).logits is not None


def _trl_style_chunked_forward(model):
    """A stand-in for TRL 1.10-1.14 SFTTrainer's patched forward: it returns its own loss plus extra fields."""

    def _patch_chunked_ce_lm_head(model):
        original = model.forward

        def _chunked_ce_forward(self, *args, labels=None, **kwargs):
            out = original(*args, labels=labels, **kwargs)
            out["num_valid_tokens"] = (labels != -100).sum() if labels is not None else None
            return out

        _chunked_ce_forward.__module__ = "trl.trainer.sft_trainer"
        model.forward = types.MethodType(_chunked_ce_forward, model)

    _patch_chunked_ce_lm_head(model)
    return model


def test_trl_chunked_loss_forward_stays_in_charge(tokenizer):
    """use_cce on top of TRL's own logits-free loss (TRL < 1.15 SFTTrainer) warns and passes calls through, so TRL's
    extra outputs survive; on a plain model the same call goes through CCE (logits=None)."""
    inputs = batch(tokenizer)
    reference = _trl_style_chunked_forward(tiny_causal_lm(hidden_size=32)).train()(**inputs)
    model = _trl_style_chunked_forward(tiny_causal_lm(hidden_size=32)).train()
    with pytest.warns(UserWarning, match="chunked loss .*stays in charge"):
        hfx.use_cce(model)
    out = model(**inputs)
    assert out.num_valid_tokens == (inputs["labels"] != -100).sum() and out.logits is not None
    torch.testing.assert_close(out.loss, reference.loss)
    hfx.use_cce(model, enabled=False)
    assert model(**inputs).num_valid_tokens is not None  # TRL's forward is back, untouched


def test_return_dict_false_and_shift_labels(tokenizer):
    inputs = batch(tokenizer)
    ref = tiny_causal_lm(hidden_size=32).train()
    model = hfx.use_cce(tiny_causal_lm(hidden_size=32)).train()
    out = model(**inputs, return_dict=False)
    torch.testing.assert_close(out[0], ref(**inputs).loss)
    # pre-shifted labels (context parallelism) are used as given
    shifted = torch.nn.functional.pad(inputs["labels"], (0, 1), value=-100)[:, 1:].contiguous()
    kw = {k: v for k, v in inputs.items() if k != "labels"}
    torch.testing.assert_close(
        model(**kw, labels=inputs["labels"], shift_labels=shifted).loss,
        ref(**kw, labels=inputs["labels"], shift_labels=shifted).loss,
    )


def test_softcap_from_config(tokenizer):
    """Gemma-2-style final_logit_softcapping: CCE applies it (the config is restored afterwards)."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    config = Gemma2Config(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        final_logit_softcapping=2.0,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = assert_cce_loss_matches(Gemma2ForCausalLM, config, tokenizer, tol=1e-6)
    assert model.config.final_logit_softcapping == 2.0


def assert_cce_loss_matches(cls, config, tokenizer, tol: float):
    """Two same-weight models of ``cls``, one under use_cce: their training losses agree; returns the CCE one."""
    torch.manual_seed(0)
    ref = cls(config).train()
    model = hfx.use_cce(cls(config)).train()
    model.load_state_dict(ref.state_dict())
    inputs = batch(tokenizer)
    torch.testing.assert_close(model(**inputs).loss, ref(**inputs).loss, atol=tol, rtol=tol)
    return model


def _gemma3n(vocab):
    from transformers import Gemma3nForCausalLM, Gemma3nTextConfig

    return Gemma3nForCausalLM, Gemma3nTextConfig(
        vocab_size=vocab, vocab_size_per_layer_input=vocab, hidden_size=32, hidden_size_per_layer_input=8,
        intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
        num_kv_shared_layers=0, laurel_rank=4, sliding_window=8, final_logit_softcapping=2.0,
    )  # fmt: skip


def _mistral_large4(vocab):
    from transformers import MistralLarge4Config, MistralLarge4ForConditionalGeneration

    text = dict(
        vocab_size=vocab, hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=2, n_routed_experts=4, num_experts_per_tok=2, kv_lora_rank=16,
        qk_rope_head_dim=8, v_head_dim=16, qk_nope_head_dim=8, index_topk=8, index_head_dim=16, index_n_heads=2,
        max_position_embeddings=64, pad_token_id=0, final_logit_softcapping=2.0,
    )  # fmt: skip
    vision = dict(model_type="pixtral", hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                  num_attention_heads=2, patch_size=4, image_size=16, head_dim=8)  # fmt: skip
    return MistralLarge4ForConditionalGeneration, MistralLarge4Config(text_config=text, vision_config=vision)


def test_softcap_in_a_strict_config(tokenizer):
    """Gemma-3n types the cap as a float in a strict dataclass: setting it to None raised at the first forward."""
    cls, config = _gemma3n(len(tokenizer))  # in every supported transformers release (5.0 on)
    model = assert_cce_loss_matches(cls, config, tokenizer, tol=1e-5)
    assert model.config.get_text_config().final_logit_softcapping == 2.0


def test_a_softcap_or_transform_it_cannot_switch_off_is_refused(tokenizer):
    """RecurrentGemma / xLSTM cap their logits under other config names, and a model (or hook) can transform
    lm_head's output: CCE's loss then came back changed (2·tanh(CE/2)), silently. Now: an error."""
    from transformers import RecurrentGemmaConfig, RecurrentGemmaForCausalLM

    config = RecurrentGemmaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, lru_width=32, attention_window_size=8, logits_soft_cap=2.0,
        block_types=["recurrent", "attention"],
    )  # fmt: skip
    with pytest.raises(NotImplementedError, match=r"logits_soft_cap=2\.0"):
        hfx.use_cce(RecurrentGemmaForCausalLM(config))
    try:
        cls, config = _mistral_large4(len(tokenizer))
    except ImportError:
        pass  # transformers releases before Mistral-Large-4 (5.0 has none): nothing to refuse there
    else:
        with pytest.raises(NotImplementedError, match="keeps its logit softcap on the model"):
            hfx.use_cce(cls(config))
    model = hfx.use_cce(tiny_causal_lm(hidden_size=32).train())
    model.lm_head.register_forward_hook(lambda module, args, out: out * 2.0)  # e.g. a logit scale in a hook
    with pytest.raises(RuntimeError, match="transforms lm_head's output"):
        model(**batch(tokenizer))


def test_a_forward_that_post_processes_the_logits_is_named(tokenizer):
    """Inkling and Chameleon slice or mask the logits after lm_head: the 0-dim loss failed there with a bare
    'IndexError: tuple index out of range'."""
    model = tiny_causal_lm(hidden_size=32).train()
    head_forward = model.lm_head.forward

    def slicing_forward(self, *args, labels=None, **kwargs):  # what such a model does after its head
        hidden = self.model(*args, **kwargs).last_hidden_state
        logits = self.lm_head(hidden)
        return types.SimpleNamespace(logits=logits[..., : logits.shape[-1] - 1], loss=None)

    model.forward = types.MethodType(slicing_forward, model)
    hfx.use_cce(model)
    with pytest.raises(RuntimeError, match="forward failed after lm_head") as err:
        model(**batch(tokenizer))
    assert isinstance(err.value.__cause__, IndexError)
    assert model.lm_head.forward != head_forward  # still installed; the error is per call


def test_accelerate_hooked_head(tokenizer):
    """accelerate's hook (offload, device_map) was skipped by the CCE path (meta weights: an error), and
    use_cce(enabled=False) deleted it (the model then returned NaN)."""
    from accelerate import cpu_offload

    inputs = batch(tokenizer)
    ref = tiny_causal_lm(hidden_size=32, tie_word_embeddings=False).train()
    want = ref(**inputs).loss
    model = tiny_causal_lm(hidden_size=32, tie_word_embeddings=False)
    model.load_state_dict(ref.state_dict())
    cpu_offload(model, execution_device="cpu")
    model.train()
    hfx.use_cce(model)
    torch.testing.assert_close(model(**inputs).loss, want, atol=1e-6, rtol=1e-6)
    hfx.use_cce(model, enabled=False)
    torch.testing.assert_close(model(**inputs).loss, want, atol=1e-6, rtol=1e-6)


def test_trainable_tokens_on_a_tied_head_is_a_clear_error(tokenizer):
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=2, target_modules=["q_proj"], trainable_token_indices={"embed_tokens": [3, 4]})
    model = get_peft_model(tiny_causal_lm(hidden_size=32, tie_word_embeddings=True), config)
    with pytest.raises(NotImplementedError, match="trainable_token_indices"):
        hfx.use_cce(model)


def test_peft_lora_backbone_and_modules_to_save(tokenizer):
    from peft import LoraConfig, get_peft_model

    inputs = batch(tokenizer)
    cfg = dict(r=4, target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"], init_lora_weights=False)
    ref = get_peft_model(tiny_causal_lm(hidden_size=32, tie_word_embeddings=False), LoraConfig(**cfg)).train()
    model = get_peft_model(tiny_causal_lm(hidden_size=32, tie_word_embeddings=False), LoraConfig(**cfg))
    model.load_state_dict(ref.state_dict())
    hfx.use_cce(model).train()
    out_ref, out = ref(**inputs), model(**inputs)
    assert out.logits is None
    torch.testing.assert_close(out.loss, out_ref.loss, atol=1e-6, rtol=1e-6)
    out_ref.loss.backward()
    out.loss.backward()
    g_ref, g = grads(ref), grads(model)
    assert g.keys() == g_ref.keys() and any("modules_to_save" in k for k in g)
    for k in g:
        torch.testing.assert_close(g[k], g_ref[k], atol=1e-6, rtol=1e-5, msg=k)
    with model.disable_adapter(), ref.disable_adapter():  # the original (frozen) head is used then
        torch.testing.assert_close(model(**inputs).loss, ref(**inputs).loss, atol=1e-6, rtol=1e-6)


def test_lora_on_lm_head_is_a_clear_error(tokenizer):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(
        tiny_causal_lm(hidden_size=32, tie_word_embeddings=False),
        LoraConfig(r=4, target_modules=["q_proj", "lm_head"]),
    )
    with pytest.raises(NotImplementedError, match="lm_head carries an active PEFT adapter"):
        hfx.use_cce(model)


def test_misuse_is_refused_when_use_cce_is_called():
    """A misspelt option, an unknown impl (used to pass until the first training forward) and a model without an
    lm_head (used to say 'lm_head of type NoneType') are errors naming what would work."""
    from transformers import LlamaForSequenceClassification

    model = tiny_causal_lm(hidden_size=32)
    with pytest.raises(TypeError, match=r"unsupported option\(s\) \['chunk_byte'\]; it takes \['impl', 'chunk_bytes'"):
        hfx.use_cce(model, chunk_byte=10)
    with pytest.raises(ValueError, match=r"impl must be one of \['auto', 'reference', 'triton'\], got 'cuda'"):
        hfx.use_cce(model, impl="cuda")
    assert not hfx.cce_enabled(model)
    with pytest.raises(TypeError, match=r"LlamaForSequenceClassification has no output embedding.*causal language"):
        hfx.use_cce(LlamaForSequenceClassification(model.config))


# ---------------------------------------------------------------------------------------------------------------
# Training runs: with and without use_cce, step for step.


def _common(tmp_path, **extra):
    return dict(
        output_dir=str(tmp_path),
        max_steps=3,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        learning_rate=1e-2,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
        **extra,
    )


def _losses(trainer):
    trainer.train()
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def _text_rows(tokenizer, n=32):
    from hfx.data import sft_dataset

    rows = sft_dataset(n, difficulty="easy", seed=0, format="text")
    return [{"input_ids": tokenizer(r["text"])["input_ids"]} for r in rows]


def _run_trainer(tokenizer, tmp_path, cce):
    from transformers import Trainer, TrainingArguments

    def collate(features):
        b = tokenizer.pad({"input_ids": [f["input_ids"] for f in features]}, return_tensors="pt")
        b["labels"] = b["input_ids"].masked_fill(b["attention_mask"] == 0, -100)
        return b

    model = tiny_causal_lm(hidden_size=32)
    if cce:
        hfx.use_cce(model)
    args = TrainingArguments(**_common(tmp_path, remove_unused_columns=False))
    trainer = Trainer(model=model, args=args, train_dataset=_text_rows(tokenizer), data_collator=collate)
    return _losses(trainer)


def test_trainer_run_matches(tokenizer, tmp_path, monkeypatch):
    """transformers.Trainer with gradient accumulation (the loss divided by ``num_items_in_batch``)."""
    import hfx.kernels.cce as cce_pkg

    calls = []
    original = cce_pkg.linear_cross_entropy

    def spy(*args, **kwargs):
        calls.append(kwargs.get("num_items_in_batch"))
        return original(*args, **kwargs)

    monkeypatch.setattr(cce_pkg, "linear_cross_entropy", spy)
    plain = _run_trainer(tokenizer, tmp_path / "plain", cce=False)
    assert not calls
    cce = _run_trainer(tokenizer, tmp_path / "cce", cce=True)
    assert len(plain) == 3
    assert len(calls) == 6 and all(c is not None for c in calls)  # 3 steps × 2 micro-batches, normalised
    assert cce == pytest.approx(plain, abs=1e-5)


def _run_sft(tokenizer, tmp_path, cce, before):
    from trl import SFTConfig, SFTTrainer

    from hfx.data import sft_dataset

    model = tiny_causal_lm(hidden_size=32)
    if cce and before:
        hfx.use_cce(model)
    args = SFTConfig(**_common(tmp_path), max_length=128)
    trainer = SFTTrainer(model=model, args=args, train_dataset=sft_dataset(32, seed=0), processing_class=tokenizer)
    if cce and not before:
        from hfx.kernels.cce.integration import _is_trl_chunked_loss

        if _is_trl_chunked_loss(trainer.model.forward):  # TRL 1.10-1.14: its chunked NLL forward stays in charge
            with pytest.warns(UserWarning, match="stays in charge"):
                hfx.use_cce(trainer.model)
        else:
            hfx.use_cce(trainer.model)
    return _losses(trainer)


@pytest.mark.slow
@pytest.mark.parametrize("before", [True, False])
def test_sft_trainer_run_matches(tokenizer, tmp_path, before):
    """TRL's SFTTrainer scores tokens through its own fused LM head (``fused_lm_head=True``): use_cce, applied before
    or after the trainer patches the model, leaves that path intact and the run unchanged."""
    plain = _run_sft(tokenizer, tmp_path / "plain", cce=False, before=before)
    cce = _run_sft(tokenizer, tmp_path / "cce", cce=True, before=before)
    assert len(plain) == 3
    assert cce == pytest.approx(plain, abs=1e-5)


def _run_dpo(tokenizer, tmp_path, cce, base):
    from transformers import AutoModelForCausalLM
    from trl import DPOConfig, DPOTrainer

    from hfx.data import preference_dataset

    model = AutoModelForCausalLM.from_pretrained(base)  # DPOTrainer reloads the reference model by name
    if cce:
        hfx.use_cce(model)
    args = DPOConfig(**_common(tmp_path), max_length=128)
    trainer = DPOTrainer(model=model, args=args, train_dataset=preference_dataset(32), processing_class=tokenizer)
    return _losses(trainer)


@pytest.mark.slow
def test_dpo_trainer_run_matches(tokenizer, tmp_path):
    """TRL's DPOTrainer computes per-token log-probabilities through its own fused LM head (no logits either);
    use_cce leaves that path intact."""
    from hfx.testing import save_tiny_model

    base = save_tiny_model(tmp_path / "base", hidden_size=32)
    plain = _run_dpo(tokenizer, tmp_path / "plain", cce=False, base=base)
    cce = _run_dpo(tokenizer, tmp_path / "cce", cce=True, base=base)
    assert len(plain) == 3
    assert cce == pytest.approx(plain, abs=1e-5)


def test_moe_router_aux_loss_is_kept(tokenizer):
    """A mixture-of-experts model adds router_aux_loss_coef * aux_loss to the token loss; the CCE loss keeps it."""
    from transformers import MixtralConfig, MixtralForCausalLM

    config = MixtralConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, output_router_logits=True,
        router_aux_loss_coef=0.5, pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    model = assert_cce_loss_matches(MixtralForCausalLM, config, tokenizer, tol=1e-6)
    out = model(**batch(tokenizer))
    assert out.aux_loss is not None and out.aux_loss > 0


def test_jetmoe_aux_loss_coef_is_kept(tokenizer):
    """JetMoE names its router-loss weight ``aux_loss_coef`` (not ``router_aux_loss_coef``); it used to be dropped
    (5.86 -> 4.86 at aux_loss_coef=0.5)."""
    from transformers import JetMoeConfig, JetMoeForCausalLM

    config = JetMoeConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_key_value_heads=2,
        kv_channels=8, num_local_experts=4, num_experts_per_tok=2, output_router_logits=True, aux_loss_coef=0.5,
        pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    torch.manual_seed(0)
    ref = JetMoeForCausalLM(config).train()
    model = hfx.use_cce(JetMoeForCausalLM(config)).train()
    model.load_state_dict(ref.state_dict())
    inputs = batch(tokenizer)
    want, out = ref(**inputs), model(**inputs)
    assert out.logits is None
    torch.testing.assert_close(out.loss, want.loss, atol=1e-6, rtol=1e-6)
    # transformers 5.0's JetMoE ignores the config's output_router_logits and adds no router loss: then neither side
    # has one and the losses still agree; from later releases on, both carry it
    assert (out.aux_loss is None) == (want.aux_loss is None)
    assert want.aux_loss is None or want.aux_loss > 0


def test_encoder_decoder_and_logit_z_loss_models_are_refused():
    """T5 (labels aligned with the decoder inputs, decoder output rescaled before lm_head) used to get a shifted,
    wrong loss without a word; a model adding a z-loss over all its logits (Bamba's ``z_loss_coefficient``) lost it."""
    from transformers import T5Config, T5ForConditionalGeneration

    t5 = T5ForConditionalGeneration(
        T5Config(d_model=32, d_ff=64, num_layers=1, num_heads=2, d_kv=16, vocab_size=64, decoder_start_token_id=0)
    )
    with pytest.raises(NotImplementedError, match="T5ForConditionalGeneration is an encoder-decoder model"):
        hfx.use_cce(t5)
    model = tiny_causal_lm(hidden_size=32)
    model.config.z_loss_coefficient = 0.1
    with pytest.raises(NotImplementedError, match=r"z_loss_coefficient=0.1.*use_cce\(model, z_loss=\.\.\.\)"):
        hfx.use_cce(model)
    model.config.z_loss_coefficient = 0.0
    model.z_loss_coefficient = 0.1  # Bamba applies its own copy, taken from the config at init: checked first
    with pytest.raises(NotImplementedError, match=r"Set `model\.z_loss_coefficient = 0\.0`"):
        hfx.use_cce(model)
    model.z_loss_coefficient = 0.0  # the fix the message names: accepted
    assert hfx.cce_enabled(hfx.use_cce(model))
