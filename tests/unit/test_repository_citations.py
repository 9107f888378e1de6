"""Every path a comment or docstring cites exists in the repository; nothing cites outside it.

A maintainer follows a citation such as ``docs/design.md`` or ``genlip_megatron/compat/cuda.py``;
a citation of a file that moved, or of a document that never was in the repository (the notes
the code was first written from), leaves them with nothing to read. Sections of documents are
cited by title, never by a section number (a number names no file).
The scanner reads comments (``tokenize``) and docstrings (``ast``) only: string literals in code
are data (temporary paths in tests, user-facing examples), not citations.
"""

from __future__ import annotations

import ast
import io
import re
import tokenize
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCANNED = ("genlip_megatron", "tools", "benchmarks", "tests", "examples", "pretrain_genlip.py")
CITED_ROOTS = ("docs", "genlip_megatron", "tests", "tools", "examples", "benchmarks")
# a path starts at a top-level folder (not inside a longer path such as site-packages/tools/...)
PATH_RE = re.compile(r"(?<![\w./-])(?:%s)/[\w./-]*" % "|".join(CITED_ROOTS))
FORBIDDEN = {
    r"\bDESIGN\b": "the design notes are not in the repository: cite docs/design.md",
    r"\.\./shared|shared/reference": "a folder outside the repository",
    r"reference[ ]notes": "those notes are not in the repository: cite "
                          "docs/reference-architecture.md",
    r"megatron-core-on-cpu\.md": "not in the repository: cite docs/design.md or "
                                 "genlip_megatron/compat/",
    r"§": "a numbered section of some document: cite a file in the repository (and a docs/ "
          "section by its title)",
}


def _comments_and_docstrings(source: str) -> list[tuple[int, str]]:
    """(line, text) of every comment and docstring of one Python source."""
    out = []
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            out.append((tok.start[0], tok.string))
    tree = ast.parse(source)
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
                    and isinstance(body[0].value.value, str):
                out.append((body[0].lineno, body[0].value.value))
    return out


def citation_problems(path: Path, root: Path = ROOT) -> list[str]:
    """``file:line: problem`` for each cited path missing under ``root`` and each citation of a
    document outside the repository, in one Python file's comments and docstrings."""
    rel = path.relative_to(root) if path.is_relative_to(root) else path
    problems = []
    for line, text in _comments_and_docstrings(path.read_text(encoding="utf-8")):
        for match in PATH_RE.finditer(text):
            cited = match.group(0).rstrip(".,:;-")
            if not (root / cited).exists():
                problems.append(f"{rel}:{line}: cites {cited}, which does not exist")
        for pattern, why in FORBIDDEN.items():
            if re.search(pattern, text):
                problems.append(f"{rel}:{line}: matches {pattern!r}: {why}")
    return problems


def _python_files() -> list[Path]:
    files = []
    for name in SCANNED:
        p = ROOT / name
        files += [p] if p.is_file() else sorted(p.rglob("*.py"))
    return [f for f in files if "__pycache__" not in f.parts]


def test_every_cited_path_exists_and_nothing_cites_outside_the_repository():
    files = _python_files()
    assert len(files) > 100, "the scan found too few files: wrong ROOT?"
    problems = [p for f in files for p in citation_problems(f)]
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("planted, found", [
    ("# the layout is in docs/no-such-page.md\n", "cites docs/no-such-page.md"),
    ('"""Moved: see genlip_megatron/training/gone.py."""\n',
     "cites genlip_megatron/training/gone.py"),
    ("def f():\n    \"\"\"As in DESIGN 5.\"\"\"\n", "DESIGN"),
    ("# see reference " "notes 2.4\n", "reference[ ]notes"),
    ("# (megatron-core-on-cpu.md 3.3)\n", "megatron-core-on-cpu"),
    ("# ../" "shared/STYLE.md\n", "shared"),
    ("# the init rules (notes §2.7)\n", "§"),
])
def test_scanner_finds_a_planted_bad_citation(tmp_path, planted, found):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "design.md").write_text("# design\n")
    bad = tmp_path / "bad.py"
    bad.write_text(planted)
    problems = citation_problems(bad, root=tmp_path)
    assert len(problems) == 1 and found in problems[0], problems


def test_scanner_accepts_good_citations_and_ignores_code_strings(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "design.md").write_text("# design\n")
    good = tmp_path / "good.py"
    good.write_text('"""Background: docs/design.md."""\n'
                    'OUT = "docs/not-a-citation.md"  # written at run time; see docs/design.md\n'
                    "site = 'lib/site-packages/tools/x.py'\n")
    assert citation_problems(good, root=tmp_path) == []


MD_LINK_RE = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


def markdown_link_problems(page: Path, root: Path = ROOT) -> list[str]:
    """``page:line: problem`` for each relative link of a Markdown page whose target is missing,
    and each citation of a document outside the repository."""
    rel = page.relative_to(root) if page.is_relative_to(root) else page
    problems = []
    for line, text in enumerate(page.read_text(encoding="utf-8").splitlines(), 1):
        for match in MD_LINK_RE.finditer(text):
            target = match.group(1)
            if "://" not in target and not (page.parent / target).exists():
                problems.append(f"{rel}:{line}: links {target}, which does not exist")
        for pattern, why in FORBIDDEN.items():
            if pattern != r"§" and re.search(pattern, text):
                problems.append(f"{rel}:{line}: matches {pattern!r}: {why}")
    return problems


def test_readme_and_docs_links_resolve():
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    assert len(pages) > 5, "docs/ pages missing"
    problems = [p for page in pages for p in markdown_link_problems(page)]
    assert not problems, "\n".join(problems)


def test_link_check_finds_a_planted_dead_link(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "design.md").write_text("# design\n")
    page = tmp_path / "docs" / "page.md"
    page.write_text("See [design](design.md#layers), [gone](gone.md) and "
                    "[upstream](https://example.org/x.md).\n")
    problems = markdown_link_problems(page, root=tmp_path)
    assert len(problems) == 1 and "links gone.md" in problems[0], problems
