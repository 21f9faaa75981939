"""`import lightning_parallel` stays lean: no optional dependency, no CUDA initialisation."""

from __future__ import annotations

import subprocess
import sys

from tests.test_configs import ROOT

# torch itself may import matplotlib or zstandard when they are installed, so the probe counts what
# importing lightning_parallel adds on top of torch, Lightning and torchmetrics.
PROBE = """
import sys
import torch, lightning, torchmetrics
before = set(sys.modules)
import lightning_parallel
import lightning_parallel.strategies, lightning_parallel.plugins, lightning_parallel.callbacks
added = set(sys.modules) - before
heavy = sorted(m for m in ("bitsandbytes", "matplotlib", "zstandard", "transformers") if m in added or m == "bitsandbytes" and m in sys.modules)
print("HEAVY=" + ",".join(heavy))
print("CUDA_INIT=" + str(torch.cuda.is_initialized()))
print("ALL_SORTED=" + str(list(lightning_parallel.__all__) == sorted(lightning_parallel.__all__)))
"""


def test_import_pulls_no_optional_dependency() -> None:
    result = subprocess.run(
        [sys.executable, "-c", PROBE], cwd=ROOT, capture_output=True, text=True, timeout=120, check=True
    )
    assert "HEAVY=\n" in result.stdout, result.stdout
    assert "CUDA_INIT=False" in result.stdout
    assert "ALL_SORTED=True" in result.stdout


def test_public_names_resolve() -> None:
    import lightning_parallel

    for name in lightning_parallel.__all__:
        assert getattr(lightning_parallel, name) is not None


def test_engine_packages_import_no_lightning() -> None:
    """pipeline/, interlocking/, auxnet/, utils/, compression/, kfac/, quantization/ ... are plain PyTorch: no Lightning import."""
    import ast

    offenders = []
    for package in ("pipeline", "interlocking", "auxnet", "utils", "compression", "kfac", "quantization", "layers", "sparse", "implicit", "ode"):
        for path in sorted((ROOT / "lightning_parallel" / package).glob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                names = []
                if isinstance(node, ast.Import):
                    names = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and node.module:
                    names = [node.module]
                offenders += [f"{path.name}: {n}" for n in names if n.split(".")[0] in ("lightning", "pytorch_lightning")]
    assert not offenders, offenders
