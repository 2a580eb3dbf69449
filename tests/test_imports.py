"""Every module and script imports, and the package never imports a script."""

import importlib
import pkgutil
import re
from pathlib import Path

import nanoalign

REPO = Path(__file__).resolve().parents[1]


def test_every_module_and_script_imports():
    for info in pkgutil.iter_modules(nanoalign.__path__):
        importlib.import_module(f"nanoalign.{info.name}")
    for script in sorted(REPO.glob("train_*.py")):
        module = importlib.import_module(script.stem)
        assert hasattr(module, "main") and hasattr(module, "Config"), script.name


def test_package_never_imports_scripts():
    for path in (REPO / "nanoalign").glob("*.py"):
        assert not re.search(r"^\s*(import|from) (train_|bench|experiments)", path.read_text(), re.M), path.name
