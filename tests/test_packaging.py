"""What ships: the installed wheel holds every module of the source tree, every module imports from outside
the clone, and an integration whose package is missing names it and the extra that installs it."""

import ast
import importlib
import importlib.metadata
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

import halo_ops

ROOT = Path(__file__).resolve().parents[1]
SHIPPED_SUFFIXES = {".py", ".json"}  # modules and package data (the tuned config table)


def _package_folders() -> dict[str, str]:
    """setup.py's PACKAGE_FOLDERS (import package -> source folder), read without running setup()."""
    tree = ast.parse((ROOT / "setup.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "PACKAGE_FOLDERS" for t in node.targets):
            return ast.literal_eval(node.value)
    raise AssertionError("setup.py defines no PACKAGE_FOLDERS")


def _source_files() -> set[str]:
    """Every module and data file of the source tree, named by its path inside the installed package."""
    files = set()
    for package, folder in _package_folders().items():
        prefix = Path(*package.split("."))
        for path in (ROOT / folder).rglob("*"):
            if path.suffix in SHIPPED_SUFFIXES and "__pycache__" not in path.parts:
                files.add((prefix / path.relative_to(ROOT / folder)).as_posix())
    return files


def test_suite_runs_against_the_installed_package():
    assert Path(halo_ops.__file__).resolve().parent != ROOT / "halo_ops"
    assert importlib.metadata.version("halo-ops") == halo_ops.__version__


def test_installed_files_equal_the_source_tree():
    installed = {f.as_posix() for f in importlib.metadata.files("halo-ops")
                 if f.parts[0] == "halo_ops" and f.suffix in SHIPPED_SUFFIXES}
    source = _source_files()
    assert installed == source, (f"missing from the wheel: {sorted(source - installed)}; "
                                 f"not in the source tree: {sorted(installed - source)}")


def test_every_module_imports_outside_the_clone(tmp_path):
    names = ["halo_ops"] + [m.name for m in pkgutil.walk_packages(halo_ops.__path__, "halo_ops.")]
    assert {"halo_ops.losses.kto", "halo_ops.kernels.tiles", "halo_ops.integrations.trl"} <= set(names)
    code = ("import importlib, sys\n"
            f"for name in {names!r}:\n"
            "    module = importlib.import_module(name)\n"
            "print(importlib.import_module('halo_ops').__file__)\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert not Path(result.stdout.strip()).resolve().is_relative_to(ROOT / "halo_ops")


@pytest.mark.parametrize("module, missing, extra", [
    ("halo_ops.integrations.trl", "trl", "halo-ops[trl]"),
    ("halo_ops.integrations.trl", "transformers", "halo-ops[transformers]"),
    ("halo_ops.integrations.transformers", "transformers", "halo-ops[transformers]"),
])
def test_an_integration_names_its_missing_package(tmp_path, module, missing, extra):
    code = f"import sys\nsys.modules[{missing!r}] = None  # as if not installed\nimport {module}\n"
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("ImportError:") and missing in last and f"pip install '{extra}'" in last, last


def test_the_core_and_the_liger_dropins_need_no_optional_package(tmp_path):
    blocked = ["transformers", "trl", "liger_kernel", "datasets", "peft", "accelerate", "deepspeed"]
    code = ("import sys\n"
            f"sys.modules.update(dict.fromkeys({blocked!r}))\n"
            "import halo_ops, halo_ops.integrations.liger\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
