"""Search spaces and the one architecture value that flows through everything.

An :class:`Arch` names one subnet of an elastic MobileNetV3: a kernel size and an
expand ratio for every *active* block, a depth for every stage and an input
resolution. Because inactive blocks are simply absent, every network has exactly one
``Arch`` and therefore one canonical JSON form and one id.

A :class:`SearchSpace` is a table of stage rows (widths, strides, activations, SE)
plus the elastic choices. It validates archs, samples them with a seeded generator
and encodes many of them at once into an integer matrix for the batched search.

This module needs numpy only, so the client can rebuild a network description
without the training stack.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

__all__ = [
    "Arch",
    "ArchError",
    "BlockSpec",
    "SearchSpace",
    "StageSpec",
    "get_space",
    "make_divisible",
    "register_space",
    "space_names",
]

ACTIVATIONS = ("relu", "h_swish")


class ArchError(ValueError):
    """An arch (or arch JSON) that does not belong to a search space."""


def make_divisible(value: float, divisor: int = 8) -> int:
    """Round ``value`` to a multiple of ``divisor``, never more than 10% down (MobileNet rule)."""
    new_value = max(divisor, int(value + divisor / 2) // divisor * divisor)
    if new_value < 0.9 * value:
        new_value += divisor
    return new_value


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


@dataclass(frozen=True)
class StageSpec:
    """One elastic stage: output width, stride of its first block, activation, SE."""

    width: int
    stride: int
    act: str
    se: bool


@dataclass(frozen=True)
class BlockSpec:
    """A concrete inverted-residual block of a subnet, with every channel count resolved."""

    in_ch: int
    mid_ch: int
    out_ch: int
    kernel: int
    stride: int
    act: str
    se: bool
    se_ch: int  # 0 when the block has no SE
    expand_conv: bool  # False for the fixed first block (expand ratio 1)

    @property
    def residual(self) -> bool:
        return self.stride == 1 and self.in_ch == self.out_ch


@dataclass(frozen=True)
class SearchSpace:
    """An elastic MobileNetV3 space, written as a table like the paper's."""

    name: str
    in_channels: int
    num_classes: int
    resolutions: tuple[int, ...]
    stem_width: int
    stem_stride: int
    first_block_width: int
    stages: tuple[StageSpec, ...]
    final_expand_width: int
    head_width: int
    kernel_choices: tuple[int, ...] = (3, 5, 7)
    expand_choices: tuple[int, ...] = (3, 4, 6)
    depth_choices: tuple[int, ...] = (2, 3, 4)
    dropout: float = 0.1
    bn_momentum: float = 0.1
    bn_eps: float = 1e-5
    divisor: int = 8
    se_reduction: int = 4
    description: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        for name in ("resolutions", "kernel_choices", "expand_choices", "depth_choices"):
            values = tuple(sorted(set(int(v) for v in getattr(self, name))))
            if not values:
                raise ValueError(f"space {self.name!r}: {name} must not be empty")
            object.__setattr__(self, name, values)
        object.__setattr__(self, "stages", tuple(
            s if isinstance(s, StageSpec) else StageSpec(**s) for s in self.stages
        ))
        if any(k % 2 == 0 or k < 1 for k in self.kernel_choices):
            raise ValueError(f"space {self.name!r}: kernel_choices must be odd, got {self.kernel_choices}")
        if min(self.depth_choices) < 1:
            raise ValueError(f"space {self.name!r}: depth_choices must be >= 1")
        for i, s in enumerate(self.stages):
            if s.act not in ACTIVATIONS:
                raise ValueError(f"space {self.name!r}: stages[{i}].act must be one of {ACTIVATIONS}")
            if s.stride not in (1, 2):
                raise ValueError(f"space {self.name!r}: stages[{i}].stride must be 1 or 2")

    # ---- shape of the space -------------------------------------------------
    @property
    def max_depth(self) -> int:
        return max(self.depth_choices)

    @property
    def num_stages(self) -> int:
        return len(self.stages)

    @property
    def num_slots(self) -> int:
        """Block positions in the supernet (stages × max depth)."""
        return self.num_stages * self.max_depth

    def size(self) -> int:
        """How many distinct subnets the space holds."""
        per_block = len(self.kernel_choices) * len(self.expand_choices)
        per_stage = sum(per_block**d for d in self.depth_choices)
        return per_stage**self.num_stages * len(self.resolutions)

    def mid_channels(self, in_ch: int, expand: int) -> int:
        return make_divisible(round(in_ch * expand), self.divisor)

    def se_channels(self, mid_ch: int) -> int:
        return make_divisible(mid_ch // self.se_reduction, self.divisor)

    def stage_in_channels(self) -> list[int]:
        """Input width of each stage's first block."""
        widths = [self.first_block_width] + [s.width for s in self.stages]
        return widths[:-1]

    def first_block(self) -> BlockSpec:
        return BlockSpec(
            in_ch=self.stem_width, mid_ch=self.stem_width, out_ch=self.first_block_width,
            kernel=3, stride=1, act="relu", se=False, se_ch=0, expand_conv=False,
        )

    def blocks(self, arch: Arch) -> list[BlockSpec]:
        """Every block of ``arch`` with channels resolved (the first, fixed block included)."""
        self.validate(arch)
        out = [self.first_block()]
        in_ch = self.first_block_width
        for stage, pairs in zip(self.stages, arch.stages()):
            for j, (k, e) in enumerate(pairs):
                mid = self.mid_channels(in_ch, e)
                out.append(BlockSpec(
                    in_ch=in_ch, mid_ch=mid, out_ch=stage.width, kernel=k,
                    stride=stage.stride if j == 0 else 1, act=stage.act, se=stage.se,
                    se_ch=self.se_channels(mid) if stage.se else 0, expand_conv=True,
                ))
                in_ch = stage.width
        return out

    # ---- validation ---------------------------------------------------------
    def validate(self, arch: Arch) -> Arch:
        """Return ``arch`` if it belongs to this space, else raise :class:`ArchError`."""
        if not isinstance(arch, Arch):
            raise ArchError(f"expected an Arch, got {type(arch).__name__}")
        if len(arch.depth) != self.num_stages:
            raise ArchError(
                f"depth must have {self.num_stages} entries (one per stage) in space "
                f"{self.name!r}, got {len(arch.depth)}"
            )
        for i, d in enumerate(arch.depth):
            if d not in self.depth_choices:
                raise ArchError(f"depth[{i}] = {d} is not allowed; choose from {list(self.depth_choices)}")
        for name, choices in (("kernel", self.kernel_choices), ("expand", self.expand_choices)):
            for i, v in enumerate(getattr(arch, name)):
                if v not in choices:
                    raise ArchError(f"{name}[{i}] = {v} is not allowed; choose from {list(choices)}")
        if arch.resolution not in self.resolutions:
            raise ArchError(
                f"resolution = {arch.resolution} is not allowed; choose from "
                f"{_describe_range(self.resolutions)}"
            )
        return arch

    def arch_from_json(self, text: str | bytes) -> Arch:
        return self.validate(Arch.from_json(text))

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

    # ---- corner archs and sampling -----------------------------------------
    def _uniform(self, k: int, e: int, d: int, r: int) -> Arch:
        n = d * self.num_stages
        return Arch((k,) * n, (e,) * n, (d,) * self.num_stages, r)

    def largest(self, resolution: int | None = None) -> Arch:
        return self._uniform(max(self.kernel_choices), max(self.expand_choices),
                             self.max_depth, resolution or max(self.resolutions))

    def smallest(self, resolution: int | None = None) -> Arch:
        return self._uniform(min(self.kernel_choices), min(self.expand_choices),
                             min(self.depth_choices), resolution or min(self.resolutions))

    def sample(self, rng: np.random.Generator | int | None = None, n: int | None = None,
               resolution: int | None = None) -> Arch | list[Arch]:
        """Uniform random arch(s) from a seeded generator (``n=None`` gives one Arch)."""
        rng = np.random.default_rng(rng)
        codes = self.sample_codes(rng, 1 if n is None else n)
        if resolution is not None:
            if resolution not in self.resolutions:
                raise ArchError(f"resolution = {resolution} is not allowed; choose from "
                                f"{_describe_range(self.resolutions)}")
            codes[:, -1] = self.resolutions.index(resolution)
        archs = self.decode(codes)
        return archs[0] if n is None else archs

    # ---- integer encoding ----------------------------------------------------
    # One row per arch: [kernel index per slot | expand index per slot | depth index
    # per stage | resolution index]. Slots past a stage's depth are ignored by decode,
    # so a search may keep "latent" values there; encode writes -1.
    @property
    def code_length(self) -> int:
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

    # ---- (de)serialisation ---------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["stages"] = [dataclasses.asdict(s) for s in self.stages]
        for key, value in d.items():
            if isinstance(value, tuple):
                d[key] = list(value)
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "SearchSpace":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown search-space fields {unknown}; allowed: {sorted(names)}")
        try:
            stages = tuple(StageSpec(**s) for s in data["stages"])
            return cls(**{**data, "stages": stages})
        except (KeyError, TypeError) as e:
            raise ValueError(f"malformed search space: {e}") from None


def _describe_range(values: Sequence[int]) -> str:
    values = list(values)
    steps = {b - a for a, b in zip(values, values[1:])}
    if len(values) > 4 and len(steps) == 1:
        return f"{values[0]}..{values[-1]} in steps of {steps.pop()}"
    return str(values)


# ---- the registry --------------------------------------------------------------
_SPACES: dict[str, SearchSpace] = {}


def register_space(space: SearchSpace) -> SearchSpace:
    """Add a space under its name; a second space with the same name is refused."""
    if space.name in _SPACES:
        raise ValueError(f"search space {space.name!r} is already registered")
    _SPACES[space.name] = space
    return space


def get_space(name: str) -> SearchSpace:
    try:
        return _SPACES[name]
    except KeyError:
        raise KeyError(f"unknown search space {name!r}; known: {space_names()}") from None


def space_names() -> list[str]:
    return sorted(_SPACES)


# The reference OFA-MobileNetV3 (width 1.0), as in the paper's Table.
register_space(SearchSpace(
    name="mbv3-imagenet",
    in_channels=3,
    num_classes=1000,
    resolutions=tuple(range(128, 225, 4)),
    stem_width=16,
    stem_stride=2,
    first_block_width=16,
    stages=(
        StageSpec(24, 2, "relu", False),
        StageSpec(40, 2, "relu", True),
        StageSpec(80, 2, "h_swish", False),
        StageSpec(112, 1, "h_swish", True),
        StageSpec(160, 2, "h_swish", True),
    ),
    final_expand_width=960,
    head_width=1280,
    description="OFA-MobileNetV3 w1.0 (ImageNet, 128-224 px); checkpoint-compatible with the reference",
))

# Small images (Fashion-MNIST 28 px, CIFAR 32 px): a stride-1 stem of 8 channels and
# three downsamplings instead of five, so a 28 px input ends on a 4x4 map. Measured
# here (2 threads, batch 128 @28, channels_last): the largest subnet trains at ~230
# img/s and the smallest at ~1,300; 16-channel stems or wider stages cost 2x.
register_space(SearchSpace(
    name="mbv3-small-images",
    in_channels=1,
    num_classes=10,
    resolutions=(24, 28, 32),
    stem_width=8,
    stem_stride=1,
    first_block_width=8,
    stages=(
        StageSpec(16, 2, "relu", False),
        StageSpec(24, 2, "relu", True),
        StageSpec(40, 1, "h_swish", False),
        StageSpec(48, 1, "h_swish", True),
        StageSpec(64, 2, "h_swish", True),
    ),
    final_expand_width=384,
    head_width=512,
    description="MobileNetV3 blocks for 24-32 px inputs (Fashion-MNIST, CIFAR)",
))
