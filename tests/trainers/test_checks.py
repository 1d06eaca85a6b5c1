"""Wrongly typed hfx fields of the trainer configs are refused at construction, naming the field and the type
(they used to pass and fail later as bare TypeErrors, or be read as truthy); numeric strings, as a YAML file or a
command line passes them, are read as numbers."""

from __future__ import annotations

import pytest

import hfx
from hfx.trainers._checks import check_fields

COMMON = dict(output_dir="unused", use_cpu=True, bf16=False, report_to="none")
CONSTRAINED = dict(constraint_thresholds=[0.5])

BAD = [
    (hfx.GVMRAFTConfig, {"gvm_num_pilot": 2.5}, r"GVMRAFTConfig\.gvm_num_pilot must be an int, got 2\.5"),
    (hfx.GVMGRPOConfig, {"gvm_pool_size": "big"}, r"gvm_pool_size must be an int or None, got 'big'"),
    (hfx.GVMRAFTConfig, {"gvm": "no"}, r"GVMRAFTConfig\.gvm must be True or False, got 'no'"),
    (hfx.GVMRAFTConfig, {"gvm_alpha": None}, r"gvm_alpha must be a number, got None"),
    (hfx.ConstrainedGRPOConfig, {"constraint_thresholds": ["a", "b"]}, r"constraint_thresholds must be a list of num"),
    (hfx.ConstrainedRLOOConfig, {**CONSTRAINED, "lagrange_lr": "fast"}, r"ConstrainedRLOOConfig\.lagrange_lr must be"),
    (hfx.ConstrainedGRPOConfig, {**CONSTRAINED, "lagrange_scale_beta": 1}, r"lagrange_scale_beta must be True or Fal"),
    (
        hfx.DynamicWeightGRPOConfig,
        {"maximize": True},
        r"maximize must be a list of True/False values.*\[True, False\]",
    ),
    (hfx.DynamicWeightRLOOConfig, {"maximize": ["yes", "no"]}, r"maximize must be a list of True/False values"),
    (hfx.DynamicWeightGRPOConfig, {"weight_grad_max_samples": 1.5}, r"weight_grad_max_samples must be an int or None"),
    (hfx.MaskedThoughtConfig, {"mask_rate": None}, r"MaskedThoughtConfig\.mask_rate must be a number, got None"),
    (hfx.MaskedThoughtConfig, {"mask_rate": "0.2x"}, r"mask_rate must be a number, got '0\.2x'"),
    (hfx.MaskedThoughtConfig, {"mask_seed": "s"}, r"mask_seed must be an int or None"),
    (hfx.BVPOConfig, {"bvpo_alpha": None}, r"bvpo_alpha must be a float in \[0, 1\] or 'auto', got None"),
    (hfx.BVPOConfig, {"bvpo_alpha": [0.5]}, r"bvpo_alpha must be a float in \[0, 1\] or 'auto'"),
    (hfx.BVPOConfig, {"bvpo_alpha": True}, r"bvpo_alpha must be a float in \[0, 1\] or 'auto', got True"),
    (hfx.BVPOConfig, {"bvpo_alpha_warmup_steps": "x"}, r"bvpo_alpha_warmup_steps must be an int, got 'x'"),
    (hfx.BVPOConfig, {"no_trace_suffix": 5}, r"no_trace_suffix must be a string or None, got 5"),
]


@pytest.mark.parametrize("cls,kwargs,match", BAD, ids=[f"{c.__name__}-{next(iter(k))}" for c, k, _ in BAD])
def test_wrong_types_name_the_field(cls, kwargs, match, tmp_path):
    with pytest.raises(ValueError, match=match):
        cls(**{**COMMON, "output_dir": str(tmp_path)}, **kwargs)


def test_numeric_strings_and_single_values_are_read_as_intended(tmp_path):
    common = {**COMMON, "output_dir": str(tmp_path)}
    assert hfx.GVMRAFTConfig(**common, gvm_num_pilot="8").gvm_num_pilot == 8
    c = hfx.ConstrainedGRPOConfig(**common, constraint_thresholds=0.9, lagrange_lr="3", constraint_types="le")
    assert (c.constraint_thresholds, c.lagrange_lr, c.constraint_types) == ([0.9], 3.0, ["le"])
    assert hfx.DynamicWeightGRPOConfig(**common, weight_regularization="1e-5").weight_regularization == 1e-5
    assert hfx.MaskedThoughtConfig(**common, mask_rate="0.3").mask_rate == 0.3
    assert hfx.BVPOConfig(**common, bvpo_alpha_modules="a, b").bvpo_alpha_modules == ["a", "b"]
    assert hfx.BVPOConfig(**common, bvpo_alpha="0.25").bvpo_alpha == 0.25


def test_check_fields_kinds():
    class Args:
        a, b, c, d, e = 3, None, "x", [1, "2"], True

    args = Args()
    check_fields(args, {"a": "int", "b": "number?", "c": "str", "d": "list[int]", "e": "bool"})
    assert args.d == [1, 2]
    for spec, match in [({"a": "bool"}, "Args.a must be True or False, got 3"),
                        ({"b": "number"}, "Args.b must be a number, got None"),
                        ({"e": "int"}, "Args.e must be an int, got True"),
                        ({"c": "list[str]"}, "Args.c must be a list of strings, got 'x'")]:  # fmt: skip
        with pytest.raises(ValueError, match=match):
            check_fields(args, spec)
