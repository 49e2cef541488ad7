"""The wheel ships the CUDA sources of csrc/ and, installed on its own, the loader finds them."""

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SOURCES = {"bindings.cpp", "multi_tensor.h", "multi_tensor_apply.cuh", "multi_tensor_kernels.cu"}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    out, source = tmp_path_factory.mktemp("wheel"), tmp_path_factory.mktemp("source")
    # build from a copy: setuptools leaves build/ behind, and a stale build/ would leak into wheels
    for name in ("setup.py", "README.md", "MANIFEST.in"):
        shutil.copy2(ROOT / name, source / name)
    for name in ("deepopt", "csrc"):
        shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    "-w", str(out), str(source)], check=True, capture_output=True)
    wheels = list(out.glob("deepopt_torch-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


def test_csrc_lives_at_the_repository_root():
    assert SOURCES <= {p.name for p in (ROOT / "csrc").iterdir()}
    assert not (ROOT / "deepopt" / "csrc").exists()


def test_wheel_contains_the_cuda_sources(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {f"deepopt/csrc/{name}" for name in SOURCES} <= names


def test_installed_wheel_finds_its_sources(wheel, tmp_path):
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(wheel)],
                   check=True, capture_output=True)
    code = ("import deepopt._cuda_ext as e, pathlib; "
            "assert pathlib.Path(e.__file__).is_relative_to(pathlib.Path(r'%s')), e.__file__; "
            "missing = [str(s) for s in e.SOURCES + e.HEADERS if not s.exists()]; "
            "assert not missing, missing; print(e.CSRC)" % target)
    result = subprocess.run([sys.executable, "-c", code], env={"PYTHONPATH": str(target), "PATH": ""},
                            capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert Path(result.stdout.strip()).is_relative_to(target)
