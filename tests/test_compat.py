"""hfx.compat: keywords that changed name across the supported transformers releases."""

from __future__ import annotations

import pytest
import transformers
import trl

from hfx.compat import activation_checkpointing


@pytest.mark.parametrize("enabled", [False, True])
def test_activation_checkpointing_keyword_is_accepted_and_takes_effect(tmp_path, enabled):
    kwargs = activation_checkpointing(enabled)
    (name,) = kwargs
    assert name in transformers.TrainingArguments.__dataclass_fields__
    # TRL's configs default to checkpointing on; the keyword must override that on this release without an error
    args = trl.SFTConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, report_to="none", **kwargs)
    assert getattr(args, name) is enabled
    new = "activation_checkpointing" in transformers.TrainingArguments.__dataclass_fields__
    assert name == ("activation_checkpointing" if new else "gradient_checkpointing")


def test_activation_checkpointing_rejects_non_bool():
    with pytest.raises(TypeError, match="`enabled` must be True or False"):
        activation_checkpointing("no")
