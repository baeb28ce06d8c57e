"""Archs as integer code rows, the form the batched search and the predictors work on: :class:`ArchCodes`,
mixed into :class:`~ofa.space.SearchSpace` (``space.encode``, ``space.decode``, ``space.sample_codes``), and
the reference package's form of an arch (``ks``/``e``/``d`` lists over every slot).

A code row is relative to a space (its choices' indices), so the methods live on the space; this module
holds the encoding itself. Needs numpy only.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from .arch import Arch, ArchError

__all__ = ["ArchCodes"]


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
