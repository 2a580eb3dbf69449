"""The package's layers, read from the source with ast (nothing is imported): the core trains and scores on any
data and imports nothing from the helpdesk world (nanoalign/world/), the report (nanoalign/report/) or the stage
modules that join them (nanoalign.evaluate, nanoalign.rlaif, nanoalign.online); and no module of the package imports a
script (train_*.py, experiments/, bench/)."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "nanoalign"
CORE = ("model", "tokenizer", "logprobs", "losses", "sampling", "data", "checkpoint", "config", "precision", "logger",
        "scaffold", "distributed")
# python -m nanoalign.evaluate / nanoalign.rlaif, and online DPO's sampling and labellers: core and world together
ENTRY_POINTS = ("evaluate", "rlaif", "online")
SUBPACKAGES = ("world", "report")
SCRIPTS = ("bench", "experiments", "common", "conftest", "tests")  # and every train_*


def imports(source: str) -> list[tuple[int, str]]:
    """(line, dotted name) of every module a source imports: `import a.b` gives a.b, `from a import b` gives a.b
    (b may be a module), a relative import is spelled from nanoalign, and importlib.import_module("a.b") or
    __import__("a.b") with a literal name gives a.b."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = ".".join(["nanoalign"] * bool(node.level) + [node.module or ""]).strip(".")
            found += [(node.lineno, f"{base}.{a.name}") for a in node.names]
        elif (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str)
              and (getattr(node.func, "attr", None) == "import_module" or getattr(node.func, "id", None) in
                   ("import_module", "__import__"))):
            found.append((node.lineno, node.args[0].value))
    return found


def outside_core(source: str) -> list[str]:
    """The imports of a core module that reach past the core into the package: `line N: name`."""
    return [f"line {line}: {name}" for line, name in imports(source)
            if name.split(".")[0] == "nanoalign" and name.split(".")[1:2] != [] and name.split(".")[1] not in CORE]


def script_imports(source: str) -> list[str]:
    """The imports of a package module that name a script, a reproduction, a benchmark or a test."""
    return [f"line {line}: {name}" for line, name in imports(source)
            if name.split(".")[0] in SCRIPTS or name.startswith("train_")]


def test_every_top_level_module_has_a_layer():
    """A module added to nanoalign/ is placed in the core or among the entry points (or in a subpackage), so the
    core's check below covers it."""
    modules = {p.stem for p in PACKAGE.glob("*.py")} - {"__init__"}
    layered = set(CORE) | set(ENTRY_POINTS)
    assert not modules - layered, f"nanoalign/: modules in no layer (add them to CORE or ENTRY_POINTS): " \
                                  f"{sorted(modules - layered)}"
    assert not layered - modules, f"nanoalign/: layered modules that do not exist: {sorted(layered - modules)}"
    packages = {p.parent.name for p in PACKAGE.glob("*/__init__.py")}
    assert packages == set(SUBPACKAGES), f"nanoalign/: subpackages {sorted(packages)}, expected {sorted(SUBPACKAGES)}"


@pytest.mark.parametrize("module", CORE)
def test_the_core_imports_nothing_from_the_world_the_report_or_the_entry_points(module):
    path = PACKAGE / f"{module}.py"
    bad = outside_core(path.read_text(encoding="utf-8"))
    assert not bad, f"nanoalign/{module}.py is core and imports outside the core: {'; '.join(bad)}"


def test_the_package_never_imports_a_script():
    bad = [f"{path.relative_to(PACKAGE.parent)} {hit}" for path in sorted(PACKAGE.rglob("*.py"))
           for hit in script_imports(path.read_text(encoding="utf-8"))]
    assert not bad, "the package imports scripts:\n  " + "\n  ".join(bad)


@pytest.mark.parametrize("source,name", [
    ("from nanoalign import gold_judge", "nanoalign.gold_judge"),
    ("from nanoalign import world", "nanoalign.world"),
    ("from nanoalign.world import helpdesk", "nanoalign.world.helpdesk"),
    ("from nanoalign.world.files import write_world", "nanoalign.world.files.write_world"),
    ("import nanoalign.report.pipeline", "nanoalign.report.pipeline"),
    ("def f():\n    from nanoalign.evaluate import curve_point", "nanoalign.evaluate.curve_point"),
    ("from . import rlaif", "nanoalign.rlaif"),
    ("from .report import figures", "nanoalign.report.figures"),
    ("import importlib\nimportlib.import_module('nanoalign.world.grammar')", "nanoalign.world.grammar"),
])
def test_the_check_finds_each_way_of_importing_past_the_core(source, name):
    assert [hit.split(": ")[1] for hit in outside_core(source)] == [name]


def test_the_check_passes_core_imports_and_finds_scripts():
    core = "from nanoalign import losses\nfrom nanoalign.data import collate\nimport nanoalign.model\nimport torch"
    assert outside_core(core) == [] and script_imports(core) == []
    scripts = "import train_ppo\nfrom experiments.frontier import run\nfrom bench.common import machine"
    assert [hit.split(": ")[1] for hit in script_imports(scripts)] == ["train_ppo", "experiments.frontier.run",
                                                                        "bench.common.machine"]
