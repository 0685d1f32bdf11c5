"""The wheel carries everything the CPU kernels need: built from the checkout, installed
without ``-e`` into a fresh virtualenv, its kernels compile there and the CPU path uses
them (an image built with ``pip install .`` runs what ``make test`` tested)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]
pytestmark = pytest.mark.slow

CHECK = r"""
import json, os, sys
import torch
import layers
from layers.cpu import kernels
from layers.linear import ColumnParallelLinear
from layers.ops import NATIVE
from layers.platform import select_ops, use_ops

out = {"layers_file": layers.__file__, "csrc": sorted(p.name for p in kernels.CSRC.iterdir())}
ops = select_ops("cpu", torch.float32)
out["ops"] = ops.name
out["library"] = str(kernels.build())
torch.manual_seed(0)
layer = ColumnParallelLinear(64, [(None, 0, 48)], False, torch.float32)
layer.weight.data.normal_()
x = torch.randn(5, 64)
expected = x @ layer.weight.data.T
out["packed"] = use_ops(layer, ops)
out["weight_dims"] = layer.weight.dim()
out["max_error"] = float((layer(x) - expected).abs().max())
print("RESULT " + json.dumps(out))
"""


def _run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, **kw)
    assert done.returncode == 0, f"{cmd}: {done.stdout[-2000:]}\n{done.stderr[-3000:]}"
    return done


def test_wheel_installs_and_its_kernels_compile_and_run(tmp_path):
    source = tmp_path / "src"  # a copy: building writes build/ and egg-info beside the sources
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "*.egg-info", "__pycache__", ".pytest_cache", "tests"))
    wheels = tmp_path / "wheels"
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", str(wheels), str(source)])
    (wheel,) = wheels.glob("shardlm-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    sources = {n.rsplit("/", 1)[-1] for n in names if n.startswith("layers/cpu/csrc/")}
    on_disk = {p.name for p in (ROOT / "layers/cpu/csrc").iterdir()}
    assert sources == on_disk, f"the wheel's kernel sources {sorted(sources)} != {sorted(on_disk)}"
    assert not [n for n in names if n.startswith("tests/")]

    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)])
    python = venv / "bin" / "python"
    _run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--quiet",
          str(wheel)])
    # the dependencies (torch, ...) come from this environment's site-packages as a plain path:
    # its .pth files (this checkout's editable install among them) are not processed there
    site = Path(_run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"]
                     ).stdout.strip())
    (site / "zz_test_deps.pth").write_text(sysconfig.get_path("purelib") + "\n")

    home = tmp_path / "home"
    env = {"PATH": "/usr/bin:/bin", "SHARDLM_HOME": str(home), "HOME": str(tmp_path)}
    done = _run([str(python), "-c", CHECK], cwd=tmp_path, env=env)
    import json

    out = json.loads(next(l for l in done.stdout.splitlines() if l.startswith("RESULT "))[7:])
    assert out["layers_file"].startswith(str(venv)), out  # the installed copy, not the checkout
    assert set(out["csrc"]) == on_disk
    assert out["ops"] == "cpu-kernels", out  # the kernels built: the CPU path was chosen
    assert out["library"].startswith(str(home / "kernels")) and Path(out["library"]).is_file()
    assert out["packed"] == 1 and out["weight_dims"] == 3  # the packed kernel runs the layer
    assert out["max_error"] < 1e-3
