"""The checks every hfx tuner config shares with PEFT's (hfx/tuners/_config.py): target lists become sets, a regex
``target_modules`` refuses ``layers_to_transform``, ``bias`` names the method's own option, bools are not numbers."""

from __future__ import annotations

import pytest

import hfx
from hfx.tuners._config import is_int, is_real

CONFIGS = {
    "bone": hfx.BoneConfig,
    "dsee": hfx.DseeConfig,
    "lift": hfx.LiftConfig,
    "paca": hfx.PacaConfig,
    "sara": hfx.SaraConfig,
}


@pytest.mark.parametrize("method", sorted(CONFIGS))
def test_shared_peft_fields(method):
    cls = CONFIGS[method]
    config = cls(target_modules=["q_proj", "v_proj"], exclude_modules=["lm_head"])
    assert config.target_modules == {"q_proj", "v_proj"} and config.exclude_modules == {"lm_head"}
    assert cls(target_modules=r".*\.q_proj").target_modules == r".*\.q_proj"
    with pytest.raises(ValueError, match="regex `target_modules`"):
        cls(target_modules=r".*\.q_proj", layers_to_transform=[0])
    with pytest.raises(ValueError, match="regex `target_modules`"):
        cls(target_modules=r".*\.q_proj", layers_pattern="layers")
    assert cls(target_modules=["q_proj"], layers_to_transform=[0], layers_pattern="layers").layers_to_transform == [0]
    for bias in ("none", "all", f"{method}_only"):
        assert cls(target_modules=["q_proj"], bias=bias).bias == bias
    with pytest.raises(ValueError, match=f"`bias` must be 'none', 'all' or '{method}_only', got 'lora_only'"):
        cls(target_modules=["q_proj"], bias="lora_only")


def test_number_predicates_refuse_bools():
    assert is_int(3) and is_int(0, 0) and not is_int(0, 1) and not is_int(True) and not is_int(2.0)
    assert is_real(0.5) and is_real(2) and is_real(float("nan")) and not is_real(False) and not is_real("1")
    for cls in (hfx.BoneConfig, hfx.PacaConfig, hfx.DseeConfig):
        with pytest.raises(ValueError, match="`r`"):
            cls(target_modules=["q_proj"], r=True)
