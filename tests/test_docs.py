"""docs/ against the code, so that the notes cannot rot: every backticked dotted name in docs/*.md resolves, every
cited test exists, every backticked file exists, and docs/README.md lists exactly the pages there are. Each failure
names the page and the name that no longer resolves."""

import importlib
import os
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PAGES = sorted(DOCS.glob("*.md"))
TEST_MAP = ROOT / "tests" / "README.md"  # the map from each equation and detail to its tests: checked like a page

SPAN = re.compile(r"`([^`\n]+)`")  # inline code on one line
PREFIXES = ("nanoalign.", "train_", "experiments.")
DOTTED = re.compile(r"(?:nanoalign|train_\w+|experiments)(?:\.[A-Za-z_]\w*)+")
TEST = re.compile(r"(tests/[\w/]+\.py)::([A-Za-z_]\w*)")
FILE = re.compile(r"[\w./-]+\.(?:py|md|txt|cfg)")
LINK = re.compile(r"\]\(([^)\s#]+\.md)\)")
MD_PATH = re.compile(r"[\w./-]*\.md\b")  # a Markdown document a comment may cite
TOP_SKIP = {"tests", "mutants", "out", "data", "build", "dist"}  # tests/, and what runs and tools write


def spans(page: Path) -> list[str]:
    return SPAN.findall(page.read_text(encoding="utf-8"))


def resolve(name: str):
    """The object a dotted name refers to: the longest importable module prefix, then getattr for the rest
    (nested, as in `Class.method`). Raises ImportError or AttributeError when it does not resolve."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))  # the scripts and experiments/ (a namespace package) import from the root
    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        module_name = ".".join(parts[:i])
        try:
            obj = importlib.import_module(module_name)
        except ModuleNotFoundError as e:  # only "this prefix is not a module"; a broken import inside is an error
            if e.name and (module_name == e.name or module_name.startswith(e.name + ".")):
                continue
            raise
        where = Path(getattr(obj, "__file__", None) or ROOT).resolve()
        if parts[0] != "nanoalign" and ROOT not in where.parents and where != ROOT:  # shadowed by another copy
            raise ImportError(f"{module_name} imports from {where}, outside the repository")
        for attr in parts[i:]:
            obj = getattr(obj, attr)
        return obj
    raise ImportError(f"no module {parts[0]!r}")


def defines_test(path: Path, name: str) -> bool:
    return re.search(rf"^def {re.escape(name)}\(", path.read_text(encoding="utf-8"), re.M) is not None


def page_id(page: Path) -> str:
    return str(page.relative_to(ROOT))


def test_there_are_pages_and_an_index():
    assert (DOCS / "README.md").is_file(), "docs/README.md is missing"
    assert len(PAGES) > 1, f"no pages besides the index in {DOCS}"


@pytest.mark.parametrize("page", [*PAGES, TEST_MAP], ids=page_id)
def test_every_dotted_name_resolves(page):
    missing = []
    for span in spans(page):
        if not span.startswith(PREFIXES) or FILE.fullmatch(span):  # a file such as `train_ppo.py`: checked below
            continue
        if not DOTTED.fullmatch(span):
            missing.append(f"`{span}`: not a dotted name (write module.name, no call or arguments)")
            continue
        try:
            resolve(span)
        except (ImportError, AttributeError) as e:
            missing.append(f"`{span}`: {type(e).__name__}: {e}")
    assert not missing, f"{page_id(page)}: names that do not resolve:\n  " + "\n  ".join(missing)


@pytest.mark.parametrize("page", [*PAGES, TEST_MAP], ids=page_id)
def test_every_cited_test_exists(page):
    missing = []
    for span in spans(page):
        if not span.startswith("tests/") or "::" not in span:
            continue
        match = TEST.fullmatch(span)
        if not match:
            missing.append(f"`{span}`: cite a test as tests/<file>.py::<function>, without parameters")
            continue
        path, name = ROOT / match[1], match[2]
        if not path.is_file():
            missing.append(f"`{span}`: no file {match[1]}")
        elif not defines_test(path, name):
            missing.append(f"`{span}`: {match[1]} defines no top-level `def {name}(`")
    assert not missing, f"{page_id(page)}: cited tests that do not exist:\n  " + "\n  ".join(missing)


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_every_backticked_file_exists(page):
    """`train_ppo.py`, `nanoalign/losses.py`, `dpo.md`: a path from the repository root or from docs/."""
    missing = sorted({span for span in spans(page) if FILE.fullmatch(span)
                      and not (ROOT / span).exists() and not (DOCS / span).exists()})
    assert not missing, f"docs/{page.name}: files that do not exist: {', '.join(missing)}"


def test_the_index_lists_every_page_and_only_pages_that_exist():
    index = (DOCS / "README.md").read_text(encoding="utf-8")
    listed = set(LINK.findall(index))
    pages = {p.name for p in PAGES} - {"README.md"}
    assert not listed - pages, f"docs/README.md lists pages that do not exist: {sorted(listed - pages)}"
    assert not pages - listed, f"docs/README.md does not list: {sorted(pages - listed)}"
    for page in PAGES:  # and every link between the pages lands on a page
        broken = [t for t in LINK.findall(page.read_text(encoding="utf-8")) if not (DOCS / t).is_file()]
        assert not broken, f"docs/{page.name}: links to missing pages {broken}"


def test_code_cites_only_documents_in_the_repository():
    """Every Markdown document a Python file outside tests/ names is a file of this repository (from the root or
    beside the citing file); papers are cited by author, year and section instead."""
    hits = []
    for folder, dirs, files in os.walk(ROOT):
        top = Path(folder) == ROOT
        dirs[:] = [d for d in dirs if not d.startswith(".") and not (top and d in TOP_SKIP) and d != "__pycache__"
                   and not d.endswith(".egg-info") and not (Path(folder) / d / "pyvenv.cfg").exists()]
        for name in files:
            if name.endswith(".py"):
                path = Path(folder) / name
                for cited in MD_PATH.findall(path.read_text(encoding="utf-8", errors="replace")):
                    if cited.startswith("out/") or cited == "index.md":  # the report's page, written under out/
                        continue
                    inside = ".." not in Path(cited).parts
                    if not (inside and ((ROOT / cited).is_file() or (Path(folder) / cited).is_file())):
                        hits.append(f"{path.relative_to(ROOT)}: {cited}")
    assert not hits, "Python files outside tests/ cite documents that are not in the repository:\n  " + \
        "\n  ".join(hits)
