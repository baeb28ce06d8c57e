import os
from pathlib import Path

import pytest
import torch

from ofa.space import get_space, space_names
from ofa.supernet import Supernet

ROOT = Path(__file__).resolve().parent.parent


@torch.no_grad()
def perturb(net: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give BN statistics, BN affine and kernel transforms non-trivial values.

    A freshly initialised net has identity BN statistics and identity transforms,
    which would hide slicing or ordering mistakes in eval-mode comparisons.
    """
    g = torch.Generator().manual_seed(seed)
    for name, t in net.state_dict().items():
        if name.endswith("running_mean") or name.endswith("bias"):
            t.copy_(torch.randn(t.shape, generator=g) * 0.1)
        elif name.endswith("running_var") or (name.endswith("weight") and t.dim() == 1):
            t.copy_(torch.rand(t.shape, generator=g) + 0.5)
        elif ".transform_" in name:
            t.add_(torch.randn(t.shape, generator=g) * 0.05)
    return net


@pytest.fixture(scope="session", params=space_names())
def space(request):
    return get_space(request.param)


@pytest.fixture(scope="session")
def supernets():
    """One perturbed supernet per registered space, in eval mode (treat as read-only)."""
    torch.manual_seed(0)
    return {name: perturb(Supernet(get_space(name))).eval() for name in space_names()}


def reference_dir() -> Path:
    """The reference package folder made by `make reference`; its absence is a failure."""
    path = Path(os.environ.get("OFA_REFERENCE_DIR", ROOT / ".venv" / "ref-ofa")).resolve()
    if not (path / "ofa" / "__init__.py").exists():
        pytest.fail(f"reference package missing in {path}: run `make reference` "
                    "(make test does it); this check is never skipped")
    return path
