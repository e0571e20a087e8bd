"""The distribution installs one top-level package, ``edgefleet``, and every source module in it.

The source keeps the folders ``agent/``, ``control_plane/`` and ``shared/`` at the top of the
repository; pyproject.toml maps them under ``edgefleet.`` (package-dir) and lists each package
explicitly, so a folder added without being listed would silently be left out of the wheel.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SETUPTOOLS = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
PACKAGE_DIR: dict[str, str] = SETUPTOOLS["package-dir"]
# Source folder -> the package it is installed as.
FOLDERS = {folder: package for package, folder in PACKAGE_DIR.items()}


def _source_modules() -> dict[str, Path]:
    """Every .py file under the mapped folders, by the path it has inside the wheel."""
    found = {}
    for folder, package in FOLDERS.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            if "__pycache__" in path.parts:
                continue
            inside = path.relative_to(ROOT / folder).as_posix()
            found[f"{package.replace('.', '/')}/{inside}"] = path
    return found


def test_the_folders_are_mapped_under_edgefleet() -> None:
    assert FOLDERS == {
        "edgefleet": "edgefleet",
        "agent": "edgefleet.agent",
        "control_plane": "edgefleet.control_plane",
        "shared": "edgefleet.shared",
    }


def test_the_packages_list_is_every_folder_with_an_init() -> None:
    on_disk = set()
    for folder, package in FOLDERS.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            inside = init.parent.relative_to(ROOT / folder).parts
            on_disk.add(".".join([package, *inside]))
    assert sorted(SETUPTOOLS["packages"]) == sorted(on_disk)


def test_every_folder_with_python_modules_is_a_package() -> None:
    # A folder of modules without __init__.py is not listed, so not installed (an alembic
    # versions/ folder, say): it must be a package, or not hold Python source.
    folders = {path.parent for path in _source_modules().values()}
    assert sorted(str(f.relative_to(ROOT)) for f in folders if not (f / "__init__.py").exists()) == []


@pytest.mark.slow
def test_the_wheel_holds_only_the_edgefleet_package_and_all_of_it(tmp_path: Path) -> None:
    # Built from a copy: an in-tree build would leave build/ and *.egg-info in the checkout.
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, source / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for folder in FOLDERS:
        shutil.copytree(ROOT / folder, source / folder, ignore=ignore)
    out = tmp_path / "wheel"
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--wheel-dir", str(out), str(source)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert built.returncode == 0, built.stderr[-4000:]
    (wheel,) = out.glob("edgefleet-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        top_level = archive.read(next(n for n in names if n.endswith(".dist-info/top_level.txt"))).decode()

    assert top_level.split() == ["edgefleet"]
    tops = {name.split("/", 1)[0] for name in names}
    assert {top for top in tops if not top.endswith(".dist-info")} == {"edgefleet"}
    assert sorted(set(_source_modules()) - set(names)) == []
