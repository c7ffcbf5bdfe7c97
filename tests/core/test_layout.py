"""The architecture's one-way arrows: the core never loads Lightning, and the package root loads nothing heavy."""

import subprocess
import sys


def _modules_after(code: str) -> set[str]:
    out = subprocess.run([sys.executable, "-c", code + "; import sys; print('\\n'.join(sys.modules))"],
                         capture_output=True, text=True, check=True).stdout
    return set(out.split())


def test_core_imports_no_lightning():
    loaded = _modules_after("import ham_lightning.core")
    assert not [m for m in loaded if m.split(".")[0] in ("lightning", "pytorch_lightning")]


def test_package_root_imports_no_optional_heavy_libraries():
    loaded = {m.split(".")[0] for m in _modules_after("import ham_lightning")}
    assert not loaded & {"lightning", "wandb", "matplotlib", "sklearn", "peft", "timm"}
