"""Starting a training run from a supernet that exists (``init_from``): transfer to a new dataset.

The source is an artifact folder (ours) or a reference ``OFAMobileNetV3`` checkpoint (``.pth``,
the same files ``ofa import-reference`` reads). Its blocks must have this run's geometry: the
spaces may differ only in what the data decides (the number of input channels and of classes,
the resolutions trained), else the run is refused naming the fields that differ. The classifier
is always made fresh (the classes are new), and so is the first convolution when the channel
count differs (its BN and everything after it are kept): every other tensor is copied.
"""
from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path
from typing import Any

import torch

from ..space import SearchSpace
from ..supernet import Supernet
from .config import ConfigError

__all__ = ["FRESH_CLASSIFIER", "FRESH_STEM", "Source", "init_from", "load_source", "source_supernet"]

# the tensors a transfer makes fresh (Supernet's names): always the classifier, the first conv for other channels
FRESH_CLASSIFIER = ("head.classifier.weight", "head.classifier.bias")
FRESH_STEM = ("stem.conv.weight",)

# fields a source's space may differ in: the data's, not the blocks'
_DATA_FIELDS = ("name", "in_channels", "num_classes", "resolutions", "description")


def source_supernet(path: str | Path) -> tuple[dict[str, torch.Tensor], SearchSpace, str]:
    """(state dict, space, what it is) of ``path``: an artifact folder or a reference checkpoint."""
    from ..artifact import ArtifactError, load_artifact
    from ..reference import ReferenceImportError, load_reference_state_dict, read_state_dict, reference_space

    path = Path(path)
    if path.is_dir():
        try:
            art = load_artifact(path)
        except ArtifactError as e:
            raise ConfigError(f"init_from {e}") from None
        return art.supernet.state_dict(), art.space, f"artifact {path} (digest {art.digest[:12]})"
    if not path.is_file():
        raise ConfigError(f"init_from {path} is neither an artifact folder nor a reference checkpoint file")
    try:
        state = read_state_dict(path, "init_from")
        space = reference_space(state)
        net = load_reference_state_dict(Supernet(space), state)
    except ReferenceImportError as e:
        raise ConfigError(f"init_from {e}") from None
    return net.state_dict(), space, f"reference checkpoint {path}"


def _shown(value: Any) -> Any:
    """A field's value for a message: stages as width/stride/activation(+SE), the rest as they are."""
    if isinstance(value, tuple) and value and hasattr(value[0], "width"):
        return "[" + ", ".join(f"{s.width}/{s.stride}/{s.act}{'+se' if s.se else ''}" for s in value) + "]"
    return value


def _differences(source: SearchSpace, target: SearchSpace) -> list[str]:
    aligned = dataclasses.replace(source, **{f: getattr(target, f) for f in _DATA_FIELDS})
    return [f"{f.name} ({_shown(getattr(source, f.name))} vs {_shown(getattr(target, f.name))})"
            for f in dataclasses.fields(target) if getattr(aligned, f.name) != getattr(target, f.name)]


@dataclasses.dataclass(frozen=True)
class Source:
    """A supernet to start from: its tensors, its space and what it is (for messages and the log)."""

    state: dict[str, torch.Tensor]
    space: SearchSpace
    what: str


def load_source(path: str | Path, space: SearchSpace) -> Source:
    """The supernet at ``path`` (:func:`source_supernet`), refused (:class:`ConfigError`) when its blocks
    differ from ``space``'s (the data's fields, channels, classes and resolutions, may differ)."""
    source = Source(*source_supernet(path))
    diff = _differences(source.space, space)
    if diff:  # a trained space's name says what the data adapted ("NAME@24-28px"): the registered one is before @
        raise ConfigError(f"init_from {source.what} has space {source.space.name!r}, whose blocks differ from "
                          f"this run's {space.name!r} in " + ", ".join(diff) + f": train with space="
                          f"{source.space.name.split('@')[0]} (--space), or start from a supernet of space "
                          f"{space.name!r}")
    return source


@torch.no_grad()
def init_from(supernet: Supernet, source: Source) -> dict[str, Any]:
    """Copy ``source`` (:func:`load_source`) into ``supernet`` (a fresh one of this run's space, which may
    have other channels and classes), leaving the classifier (and the first conv, for another channel
    count) as initialised. Returns what was done, for the log."""
    fresh = list(FRESH_CLASSIFIER)
    if source.space.in_channels != supernet.space.in_channels:
        fresh += FRESH_STEM
    ours = supernet.state_dict()
    missing = sorted(set(ours) - set(source.state))
    if missing:  # both are Supernets of one geometry: only another version of this code gets here
        raise ConfigError(f"init_from {source.what} lacks {len(missing)} tensors (first: {missing[:3]})")
    digest = hashlib.sha256()
    for key, tensor in ours.items():
        if key not in fresh:
            tensor.copy_(source.state[key])
            digest.update(source.state[key].cpu().numpy().tobytes())
    return {"event": "init_from", "source": source.what, "source_space": source.space.name, "fresh": fresh,
            "copied": len(ours) - len(fresh), "copied_sha256": digest.hexdigest()}
