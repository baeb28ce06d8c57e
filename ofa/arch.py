"""The one architecture value that flows through everything: :class:`Arch`.

An ``Arch`` names one subnet of an elastic MobileNetV3: a kernel size and an expand ratio for
every *active* block, a depth for every stage and an input resolution. Because inactive blocks
are simply absent, every network has exactly one ``Arch`` and therefore one canonical JSON form
and one id. An ``Arch`` needs nothing of a space to be well formed; whether it belongs to one is
:meth:`ofa.space.SearchSpace.validate`'s to say. Needs numpy only.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

import numpy as np

__all__ = ["Arch", "ArchError"]


class ArchError(ValueError):
    """An arch (or arch JSON) that does not belong to a search space."""


def _int_tuple(name: str, value: Any) -> tuple[int, ...]:
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        raise ArchError(f"{name} must be a list of integers, got {type(value).__name__}")
    items = tuple(value)
    for i, v in enumerate(items):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
            raise ArchError(f"{name}[{i}] must be an integer, got {v!r}")
    return tuple(int(v) for v in items)


@dataclass(frozen=True)
class Arch:
    """One subnet: per-active-block kernel and expand ratio, per-stage depth, resolution.

    ``kernel`` and ``expand`` list the active blocks in order, stage by stage, so
    ``len(kernel) == len(expand) == sum(depth)``.
    """

    kernel: tuple[int, ...]
    expand: tuple[int, ...]
    depth: tuple[int, ...]
    resolution: int

    def __post_init__(self) -> None:
        object.__setattr__(self, "kernel", _int_tuple("kernel", self.kernel))
        object.__setattr__(self, "expand", _int_tuple("expand", self.expand))
        object.__setattr__(self, "depth", _int_tuple("depth", self.depth))
        if isinstance(self.resolution, bool) or not isinstance(self.resolution, (int, np.integer)):
            raise ArchError(f"resolution must be an integer, got {self.resolution!r}")
        object.__setattr__(self, "resolution", int(self.resolution))
        if any(d < 1 for d in self.depth):
            raise ArchError(f"depth values must be >= 1, got {list(self.depth)}")
        n = sum(self.depth)
        for name in ("kernel", "expand"):
            got = len(getattr(self, name))
            if got != n:
                raise ArchError(
                    f"{name} must list one value per active block: sum(depth) = {n}, got {got}"
                )

    def stages(self) -> list[list[tuple[int, int]]]:
        """The (kernel, expand) pairs of each stage's active blocks."""
        out, i = [], 0
        for d in self.depth:
            out.append(list(zip(self.kernel[i : i + d], self.expand[i : i + d])))
            i += d
        return out

    def to_dict(self) -> dict[str, Any]:
        """The arch as a JSON object of lists (the form of :meth:`to_json`)."""
        return {
            "depth": list(self.depth),
            "expand": list(self.expand),
            "kernel": list(self.kernel),
            "resolution": self.resolution,
        }

    def to_json(self) -> str:
        """The canonical JSON form: sorted keys, no spaces."""
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    @property
    def id(self) -> str:
        """A stable 16-hex-digit id: the start of the sha256 of the canonical JSON."""
        return hashlib.sha256(self.to_json().encode()).hexdigest()[:16]

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Arch":
        """The arch of a JSON object with exactly the four fields; anything else raises :class:`ArchError`."""
        if not isinstance(data, Mapping):
            raise ArchError(f"an arch must be a JSON object, got {type(data).__name__}")
        expected = {"kernel", "expand", "depth", "resolution"}
        missing = sorted(expected - set(data))
        unknown = sorted(set(data) - expected)
        if missing or unknown:
            raise ArchError(
                f"arch fields must be exactly {sorted(expected)}; "
                f"missing {missing}, unknown {unknown}"
            )
        return cls(data["kernel"], data["expand"], data["depth"], data["resolution"])

    @classmethod
    def from_json(cls, text: str | bytes) -> "Arch":
        """Parse an arch's JSON text (:class:`ArchError` when it does not parse or is malformed)."""
        try:
            data = json.loads(text)
        except (TypeError, ValueError) as e:
            raise ArchError(f"arch JSON does not parse: {e}") from None
        return cls.from_dict(data)

    def __str__(self) -> str:
        stages = "|".join(
            ",".join(f"k{k}e{e}" for k, e in stage) for stage in self.stages()
        )
        return f"r{self.resolution}:{stages}"
