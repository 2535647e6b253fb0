"""The content stamp that decides whether ``dsa_ops._C`` is recompiled (dsa_ops/_build_stamp.py):
it changes when a csrc/ file, setup.py or the torch/CUDA settings change, and not otherwise."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from dsa_ops import _build_stamp

INPUTS = {"torch": "2.14.1+cu130", "torch_cuda": "13.0", "nvcc": "Cuda compilation tools, release 13.0",
          "arch_list": "9.0", "ext_suffix": ".cpython-311-x86_64-linux-gnu.so", "no_cuda": "False",
          "cxx": "/usr/bin/c++"}


@pytest.fixture
def tree(tmp_path):
    """A minimal source tree: csrc/ with a kernel and a header, setup.py, pyproject.toml."""
    (tmp_path / "csrc" / "masked_attention").mkdir(parents=True)
    (tmp_path / "csrc" / "masked_attention" / "forward.cu").write_text("__global__ void k() {}\n")
    (tmp_path / "csrc" / "common.cuh").write_text("#pragma once\n")
    (tmp_path / "setup.py").write_text("setup()\n")
    (tmp_path / "pyproject.toml").write_text("[build-system]\n")
    (tmp_path / "dsa_ops").mkdir()
    (tmp_path / "README.md").write_text("docs\n")
    return tmp_path


def test_stamp_is_stable_when_nothing_changed(tree):
    first = _build_stamp.stamp(INPUTS, tree)
    (tree / "README.md").write_text("other docs\n")  # not a build input
    (tree / "tests").mkdir()
    (tree / "tests" / "test_x.py").write_text("pass\n")
    assert _build_stamp.stamp(dict(INPUTS), tree) == first


@pytest.mark.parametrize("change", ["edit a kernel", "edit a header", "add a source", "rename a source",
                                    "edit setup.py"])
def test_stamp_changes_with_the_sources(tree, change):
    before = _build_stamp.stamp(INPUTS, tree)
    kernel = tree / "csrc" / "masked_attention" / "forward.cu"
    if change == "edit a kernel":
        kernel.write_text("__global__ void k() { }\n")
    elif change == "edit a header":
        (tree / "csrc" / "common.cuh").write_text("#pragma once\n#define X 1\n")
    elif change == "add a source":
        (tree / "csrc" / "extra.cu").write_text("")
    elif change == "rename a source":
        kernel.rename(kernel.with_name("forward2.cu"))
    else:
        (tree / "setup.py").write_text("setup(name='x')\n")
    assert _build_stamp.stamp(INPUTS, tree) != before


@pytest.mark.parametrize("key, value", [("torch", "2.15.0+cu130"), ("torch_cuda", "12.8"),
                                        ("nvcc", "release 12.9"), ("arch_list", "8.0;9.0"),
                                        ("no_cuda", "True"), ("cxx", "/usr/bin/clang++")])
def test_stamp_changes_with_torch_cuda_and_arch(tree, key, value):
    assert _build_stamp.stamp({**INPUTS, key: value}, tree) != _build_stamp.stamp(INPUTS, tree)


def test_why_stale_names_the_reason_and_accepts_a_matching_library(tree, monkeypatch):
    monkeypatch.delenv(_build_stamp.FORCE_VARIABLE, raising=False)
    assert "no readable build stamp" in _build_stamp.why_stale(INPUTS, True, tree)
    library = _build_stamp.library_path(tree)
    library.write_bytes(b"\x7fELF library")
    _build_stamp.write(INPUTS, library, tree)
    assert _build_stamp.why_stale(INPUTS, True, tree) is None
    assert "torch" in _build_stamp.why_stale({**INPUTS, "torch": "2.15.0"}, True, tree)
    monkeypatch.setenv(_build_stamp.FORCE_VARIABLE, "1")
    assert _build_stamp.why_stale(INPUTS, True, tree) == f"{_build_stamp.FORCE_VARIABLE}=1"
    monkeypatch.delenv(_build_stamp.FORCE_VARIABLE)
    library.write_bytes(b"\x7fELF another library")
    assert "not the library the stamp recorded" in _build_stamp.why_stale(INPUTS, True, tree)
    library.unlink()
    assert "missing" in _build_stamp.why_stale(INPUTS, True, tree)
    assert _build_stamp.why_stale(INPUTS, False, tree) is None  # a build without the extension
    (tree / "csrc" / "common.cuh").write_text("changed\n")
    assert "csrc/" in _build_stamp.why_stale(INPUTS, False, tree)


def test_stamp_file_is_readable_json(tree):
    _build_stamp.write(INPUTS, None, tree)
    record = json.loads(_build_stamp.stamp_path(tree).read_text())
    assert record["inputs"] == INPUTS and record["library_sha256"] is None
    assert record["stamp"] == _build_stamp.stamp(INPUTS, tree)


def test_command_line_rejects_unknown_arguments():
    script = Path(_build_stamp.__file__)
    run = subprocess.run([sys.executable, str(script), "bogus"], capture_output=True, text=True, timeout=120)
    assert run.returncode == 2
    assert run.stderr.strip() == "usage: python dsa_ops/_build_stamp.py check|record"


def test_the_extension_is_expected_wherever_a_cxx_compiler_is():
    """CUDA kernels or not, setup.py builds dsa_ops._C (its CPU kernels at least) whenever
    there is a C++ compiler; only without one does the install stay pure Python."""
    assert _build_stamp.extension_expected(INPUTS)
    assert _build_stamp.extension_expected({**INPUTS, "nvcc": None, "torch_cuda": None, "no_cuda": "True"})
    assert not _build_stamp.extension_expected({**INPUTS, "cxx": None})
