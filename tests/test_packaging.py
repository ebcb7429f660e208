"""Packaging: the folders install under `saetron.*` only, both as a wheel and as an editable install."""

import subprocess
import sys
import zipfile
from pathlib import Path

import saetron.collect
import saetron.eval
import saetron.kernels
import saetron.sae

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_holds_only_saetron_packages(tmp_path):
    # --no-build-isolation: build with this venv's setuptools, no registry access needed
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(ROOT),
        ],
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("saetron-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top_level = {name.split("/")[0] for name in names if not name.split("/")[0].endswith(".dist-info")}
    assert top_level == {"saetron"}  # never top-level kernels/collect/bench (they collide on PyPI)
    for module in ("saetron/sae/model.py", "saetron/sae/architectures/topk.py",
                   "saetron/kernels/reference.py", "saetron/collect/__init__.py", "saetron/eval/run.py"):
        assert module in names
    # saetron is a namespace package: no saetron/__init__.py that could shadow another distribution
    assert "saetron/__init__.py" not in names


def test_import_names_map_to_the_folders():
    assert Path(saetron.sae.__file__).parent == ROOT / "sae"
    assert Path(saetron.kernels.__file__).parent == ROOT / "kernels"
    assert Path(saetron.collect.__file__).parent == ROOT / "collect"
    assert Path(saetron.eval.__file__).parent == ROOT / "eval"
