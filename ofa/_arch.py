"""The one architecture value and its encodings: :class:`Arch` (canonical JSON, id) and
:class:`ArchCodes`, the integer code rows and the reference package's form of archs in a space.

Private: :mod:`ofa.space` re-exports :class:`Arch` and :class:`ArchError`, and its
:class:`~ofa.space.SearchSpace` takes the encodings from :class:`ArchCodes`. They live
here to keep ``space.py`` to the space itself (its table, the slot walk, validation,
the registry); an ``Arch`` needs nothing of a space to be well formed.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

__all__ = ["Arch", "ArchCodes", "ArchError"]


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


class ArchCodes:
    """The encodings of archs in a search space, mixed into :class:`~ofa.space.SearchSpace`.

    Reads the space's ``*_choices``, ``resolutions``, ``num_slots``, ``num_stages``,
    ``max_depth`` and ``validate``; holds no state of its own.
    """

    # ---- integer encoding ----------------------------------------------------
    # One row per arch: [kernel index per slot | expand index per slot | depth index
    # per stage | resolution index]. Slots past a stage's depth are ignored by decode,
    # so a search may keep "latent" values there; encode writes -1.
    @property
    def code_length(self) -> int:
        """Columns of a code row."""
        return 2 * self.num_slots + self.num_stages + 1

    def code_choices(self) -> np.ndarray:
        """How many values each code column may take (its exclusive upper bound)."""
        return np.array(
            [len(self.kernel_choices)] * self.num_slots
            + [len(self.expand_choices)] * self.num_slots
            + [len(self.depth_choices)] * self.num_stages
            + [len(self.resolutions)],
            dtype=np.int64,
        )

    def sample_codes(self, rng: np.random.Generator | int | None, n: int) -> np.ndarray:
        """``n`` uniform random code rows (latent slots included) from a seeded generator."""
        rng = np.random.default_rng(rng)
        high = self.code_choices()
        return (rng.random((n, high.size)) * high).astype(np.int16)

    def active_mask(self, codes: np.ndarray) -> np.ndarray:
        """Boolean (N, slots): which block slots each code row uses."""
        codes = np.asarray(codes)
        n_slots = self.num_slots
        depth = np.asarray(self.depth_choices)[codes[:, 2 * n_slots : 2 * n_slots + self.num_stages]]
        pos = np.arange(self.max_depth)
        return (pos[None, None, :] < depth[:, :, None]).reshape(len(codes), n_slots)

    def encode(self, archs: Sequence[Arch]) -> np.ndarray:
        """The code rows (int16, -1 in unused slots) of archs of this space."""
        n_slots, md = self.num_slots, self.max_depth
        out = np.full((len(archs), self.code_length), -1, dtype=np.int16)
        k_index = {v: i for i, v in enumerate(self.kernel_choices)}
        e_index = {v: i for i, v in enumerate(self.expand_choices)}
        d_index = {v: i for i, v in enumerate(self.depth_choices)}
        for row, arch in enumerate(archs):
            self.validate(arch)
            i = 0
            for s, d in enumerate(arch.depth):
                for j in range(d):
                    out[row, s * md + j] = k_index[arch.kernel[i]]
                    out[row, n_slots + s * md + j] = e_index[arch.expand[i]]
                    i += 1
                out[row, 2 * n_slots + s] = d_index[d]
            out[row, -1] = self.resolutions.index(arch.resolution)
        return out

    def decode(self, codes: np.ndarray) -> list[Arch]:
        """The archs of code rows; a value out of range in a used column raises :class:`ArchError`."""
        codes = np.asarray(codes)
        if codes.ndim != 2 or codes.shape[1] != self.code_length:
            raise ArchError(f"codes must have shape (N, {self.code_length}), got {codes.shape}")
        high = self.code_choices()
        active = self.active_mask(codes)
        n_slots = self.num_slots
        check = np.concatenate([active, active, np.ones((len(codes), self.num_stages + 1), bool)], 1)
        bad = check & ((codes < 0) | (codes >= high))
        if bad.any():
            row, col = np.argwhere(bad)[0]
            raise ArchError(f"code row {row} column {col} = {codes[row, col]} is out of range [0, {high[col]})")
        ks = np.asarray(self.kernel_choices)
        es = np.asarray(self.expand_choices)
        archs = []
        for row in range(len(codes)):
            m = active[row]
            archs.append(Arch(
                tuple(ks[codes[row, :n_slots][m]].tolist()),
                tuple(es[codes[row, n_slots : 2 * n_slots][m]].tolist()),
                tuple(np.asarray(self.depth_choices)[codes[row, 2 * n_slots : -1]].tolist()),
                self.resolutions[codes[row, -1]],
            ))
        return archs

    def arch_from_reference(self, ks: Sequence[int], e: Sequence[int], d: Sequence[int],
                            r: int) -> Arch:
        """Convert the reference package's form (values for all blocks, active or not)."""
        n = self.num_slots
        if len(ks) != n or len(e) != n:
            raise ArchError(f"ks and e must have {n} entries (stages × max depth), got {len(ks)} and {len(e)}")
        kernel, expand = [], []
        for s, depth in enumerate(d):
            lo = s * self.max_depth
            kernel += list(ks[lo : lo + depth])
            expand += list(e[lo : lo + depth])
        return self.validate(Arch(kernel, expand, d, r))

    def arch_to_reference(self, arch: Arch) -> dict[str, Any]:
        """The reference form: ``ks``/``e`` for every slot (inactive slots repeat the last active)."""
        ks, es = [], []
        for pairs in arch.stages():
            pad = [pairs[-1]] * (self.max_depth - len(pairs))
            ks += [k for k, _ in pairs + pad]
            es += [e for _, e in pairs + pad]
        return {"ks": ks, "e": es, "d": list(arch.depth), "r": arch.resolution}
