"""The project is self-contained: no file of it refers to a folder beside the checkout.

CI happens to have a `shared` folder next to its clone, so a reference to it would pass there and fail on
every user's machine; this test is what catches it.
"""

from __future__ import annotations

import fnmatch
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
# Built from pieces so that this file does not match itself.
SHARED = "shared"
NEEDLES = ("../" + SHARED, "/work/" + SHARED)


def ignored(relative: Path, patterns: list[str]) -> bool:
    return any(fnmatch.fnmatch(part, pattern) for part in relative.parts for pattern in patterns)


def project_files() -> list[Path]:
    """The tracked files; in an unpacked archive (no git metadata), every file that .gitignore does not exclude."""
    if (REPO / ".git").exists():
        listed = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True, timeout=60)
        return [REPO / name for name in listed.stdout.decode().split("\0") if name]
    lines = (REPO / ".gitignore").read_text().splitlines()
    patterns = [".git"] + [line.strip("/") for line in lines if line and not line.startswith("#")]
    return [path for path in REPO.rglob("*") if path.is_file() and not ignored(path.relative_to(REPO), patterns)]


def test_no_project_file_refers_to_the_shared_folder_beside_the_checkout():
    files = project_files()
    assert any(path.name == "pyproject.toml" for path in files), f"found no project files under {REPO}"
    references = []
    for path in files:
        data = path.read_bytes()
        if b"\0" in data:  # binary (weights, images)
            continue
        for number, line in enumerate(data.decode("utf-8", errors="replace").splitlines(), 1):
            if any(needle in line for needle in NEEDLES):
                references.append(f"{path.relative_to(REPO)}:{number}: {line.strip()}")
    assert references == [], "files that refer to the folder beside the checkout:\n" + "\n".join(references)
