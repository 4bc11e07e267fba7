"""What ships with the package: the licence it declares, the Pythons it names, and the README's
links, which must lead to files of this repository."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def test_the_readme_links_only_to_files_in_the_repository() -> None:
    readme = (ROOT / "README.md").read_text()
    targets = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", readme)
    local = [target for target in targets if "://" not in target and not target.startswith("#")]
    assert "docs/DESIGN.md" in local
    for target in local:
        path = (ROOT / target).resolve()
        assert path.is_relative_to(ROOT), target
        assert path.is_file(), target


def test_the_design_notes_hold_the_invariants() -> None:
    design = (ROOT / "docs" / "DESIGN.md").read_text()
    assert design.startswith("# steadyrabbit — the invariants the design must keep")
    assert "## Invariants" in design


def test_the_license_file_is_the_declared_one() -> None:
    assert PROJECT["license"] == "MIT"
    text = (ROOT / "LICENSE").read_text()
    assert text.startswith("MIT License\n\nCopyright (c) 2026 the steadyrabbit authors\n")
    assert "Permission is hereby granted, free of charge" in text


def test_the_classifiers_name_every_python_seen_working() -> None:
    classifiers = PROJECT["classifiers"]
    assert PROJECT["requires-python"] == ">=3.11"
    versions = {
        c.rsplit(" :: ", 1)[1] for c in classifiers if re.fullmatch(r".* :: 3\.\d+", c)
    }
    assert versions == {"3.11", "3.12", "3.13"}
    assert "Programming Language :: Python :: 3 :: Only" in classifiers
    assert "Typing :: Typed" in classifiers  # py.typed ships
    # A license expression and a License classifier together are refused by setuptools >= 77.
    assert not any(c.startswith("License ::") for c in classifiers)
