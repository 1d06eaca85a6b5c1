"""hfx's registration into PEFT: enum extension, idempotence, coexistence with other registrants, clashes."""

from __future__ import annotations

import enum
import glob
import importlib
import os
import shutil
import subprocess
import sys
import textwrap
import warnings

import pytest
from peft import PeftConfig, PeftType
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING

import hfx
from hfx import _registry
from hfx.tuners.bone import BoneConfig, BoneModel


def test_bone_is_a_peft_type_after_import():
    assert PeftType.BONE == "BONE" and PeftType("BONE") is PeftType.BONE and "BONE" in list(PeftType)
    assert PEFT_TYPE_TO_CONFIG_MAPPING[PeftType.BONE] is BoneConfig
    assert PEFT_TYPE_TO_TUNER_MAPPING["BONE"] is BoneModel  # plain strings work too: PeftType is a str enum
    assert PEFT_TYPE_TO_PREFIX_MAPPING[PeftType.BONE] == "bone_"
    assert "BONE" in _registry.registered_types()


def test_register_and_reimport_are_idempotent():
    n_members = len(PeftType)
    _registry.register("bone", BoneConfig, BoneModel)
    importlib.reload(importlib.import_module("hfx.tuners.bone"))  # re-runs the module's register(...) line
    importlib.reload(hfx)
    assert len(PeftType) == n_members
    assert PEFT_TYPE_TO_CONFIG_MAPPING[PeftType.BONE].__qualname__ == "BoneConfig"
    # the reloaded classes are the registered ones, and they still build models
    assert PEFT_TYPE_TO_CONFIG_MAPPING[PeftType.BONE] is importlib.import_module("hfx.tuners.bone").BoneConfig


def test_add_enum_member_reuses_what_another_package_added():
    member = _registry.add_enum_member(PeftType, "HFX_TEST_OTHER")
    assert _registry.add_enum_member(PeftType, "HFX_TEST_OTHER") is member
    assert PeftType.HFX_TEST_OTHER is member and PeftType("HFX_TEST_OTHER") is member
    assert PEFT_TYPE_TO_CONFIG_MAPPING[PeftType.BONE] is BoneConfig  # untouched
    with pytest.raises(ValueError, match="already exists with value"):
        _registry.add_enum_member(PeftType, "HFX_TEST_OTHER", "SOMETHING_ELSE")
    with pytest.raises(ValueError, match="already used"):
        _registry.add_enum_member(PeftType, "HFX_TEST_ALIAS", "HFX_TEST_OTHER")


def test_another_registration_of_the_same_type_is_replaced_with_a_warning():
    class OtherBoneConfig(BoneConfig):
        pass

    class OtherBoneModel(BoneModel):
        pass

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _registry.register("bone", OtherBoneConfig, OtherBoneModel)
        assert PEFT_TYPE_TO_CONFIG_MAPPING[PeftType.BONE] is OtherBoneConfig
        with pytest.warns(UserWarning, match=r"registered by .*OtherBoneConfig.*hfx replaces it"):
            _registry.register("bone", BoneConfig, BoneModel)
        assert PEFT_TYPE_TO_CONFIG_MAPPING[PeftType.BONE] is BoneConfig
        assert PEFT_TYPE_TO_TUNER_MAPPING[PeftType.BONE] is BoneModel
    finally:
        _registry.register("bone", BoneConfig, BoneModel)


def test_prefix_clash_is_refused():
    class Clash(BoneModel):
        prefix = "lora_"

    with pytest.raises(ValueError, match="Prefix 'lora_'.*already used by PEFT type"):
        _registry.register("hfx_test_clash", BoneConfig, Clash, prefix="lora_")


def test_config_from_pretrained_uses_hfx_class(tmp_path):
    BoneConfig(r=8, target_modules=["q_proj"]).save_pretrained(tmp_path)
    cfg = PeftConfig.from_pretrained(tmp_path)
    assert isinstance(cfg, BoneConfig) and cfg.r == 8 and cfg.target_modules == {"q_proj"}


ENUM_CHECK = textwrap.dedent(
    """
    import enum, importlib.util, pickle, sys
    spec = importlib.util.spec_from_file_location("reg", sys.argv[1])
    # _registry imports peft (not installed for this interpreter): load just the enum helper's source
    src = open(sys.argv[1]).read()
    start = src.index("def add_enum_member"); end = src.index("\\ndef _same_class")
    ns = {"enum": enum, "sys": sys, "threading": __import__("threading")}
    ns["_LOCK"] = ns["threading"].Lock()
    exec(src[start:end], ns)
    class T(str, enum.Enum):
        A = "A"
    m = ns["add_enum_member"](T, "BONE")
    assert ns["add_enum_member"](T, "BONE") is m
    assert T.BONE is m and T("BONE") is m and T["BONE"] is m and "BONE" in list(T) and m == "BONE"
    assert list(T) == [T.A, m] and pickle.loads(pickle.dumps(m)) is m and {m: 1}["BONE"] == 1
    print("ok")
    """
)


def find_python(version: str) -> str | None:
    """An interpreter of ``version`` that really runs (pyenv shims exist for versions that are not selected)."""
    root = os.environ.get("PYENV_ROOT", os.path.expanduser("~/.pyenv"))
    candidates = sorted(glob.glob(os.path.join(root, "versions", f"{version}.*", "bin", "python")), reverse=True)
    candidates += [p for p in [shutil.which(f"python{version}")] if p]
    for exe in candidates:
        if subprocess.run([exe, "-c", "pass"], capture_output=True, timeout=60).returncode == 0:
            return exe
    return None


@pytest.mark.parametrize("version", ["3.10", "3.11", "3.12", "3.13"])
def test_enum_extension_on_each_supported_python(version, tmp_path):
    """The enum hack relies on CPython internals: check it on every Python hfx supports (3.10-3.13)."""
    exe = find_python(version)
    if exe is None:
        pytest.skip(f"no python{version} interpreter on this machine")
    script = tmp_path / "check.py"
    script.write_text(ENUM_CHECK)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    proc = subprocess.run([exe, str(script), _registry.__file__], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr


def test_enum_extension_in_this_interpreter():
    class T(str, enum.Enum):
        A = "A"

    m = _registry.add_enum_member(T, "B")
    assert list(T) == [T.A, m] and T("B") is m and sys.version_info >= (3, 10)
