"""Search spaces: what subnets of an elastic MobileNetV3 there are (the :class:`~ofa.arch.Arch` value
itself is :mod:`ofa.arch`'s; re-exported here).

A :class:`SearchSpace` is a table of stage rows (widths, strides, activations, SE)
plus the elastic choices. It validates archs, samples them with a seeded generator
and encodes many of them at once into an integer matrix for the batched search.

It also walks the supernet's block slots once (:meth:`SearchSpace.slots`: channels,
stride, map sizes per slot) for everything that needs the geometry: the blocks of a
subnet, the supernet, the MAC tables and the latency plan; and it names a space by
:func:`space_digest`. Its integer encodings are :mod:`ofa.codes`'.

This module needs numpy only, so the client can rebuild a network description
without the training stack.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping, Sequence

import numpy as np

from .arch import Arch, ArchError
from .codes import ArchCodes

__all__ = [
    "Arch",
    "ArchError",
    "BlockSpec",
    "DEFAULT_SPACE",
    "SearchSpace",
    "Slot",
    "StageSpec",
    "get_space",
    "make_divisible",
    "out_size",
    "register_space",
    "space_digest",
    "space_names",
    "squeeze_channels",
]

ACTIVATIONS = ("relu", "h_swish")


def make_divisible(value: float, divisor: int = 8) -> int:
    """Round ``value`` to a multiple of ``divisor``, never more than 10% down (MobileNet rule)."""
    new_value = max(divisor, int(value + divisor / 2) // divisor * divisor)
    if new_value < 0.9 * value:
        new_value += divisor
    return new_value


def squeeze_channels(channels: int, reduction: int = 4, divisor: int = 8) -> int:
    """The squeeze (hidden) width of an SE over ``channels``: the one rule the supernet, subnets and costs share."""
    return make_divisible(channels // reduction, divisor)


def out_size(size: int, stride: int) -> int:
    """Side of a conv's output map: same padding (k // 2) with an odd kernel gives floor((size - 1) / stride) + 1."""
    return (size - 1) // stride + 1


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
        """Whether the block adds its input (same shape in and out)."""
        return self.stride == 1 and self.in_ch == self.out_ch


@dataclass(frozen=True)
class Slot:
    """One elastic block position of the supernet: stage ``stage``, ``position`` within it.

    A subnet uses the slot when ``position < depth[stage]``. Only a stage's first slot
    changes width or strides; ``in_size``/``out_size`` are the map sides at the resolution
    the walk was asked for (0 without one).
    """

    index: int  # stage * max_depth + position: the slot's column in the codes and cost tables
    stage: int
    position: int
    in_ch: int
    spec: StageSpec
    stride: int
    in_size: int
    out_size: int

    def active(self, depth: Sequence[int]) -> bool:
        """Whether an arch of these per-stage depths uses this slot."""
        return self.position < depth[self.stage]


@dataclass(frozen=True)
class SearchSpace(ArchCodes):
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
        object.__setattr__(self, "stages",
                           tuple(s if isinstance(s, StageSpec) else StageSpec(**s) for s in self.stages))
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
        """Blocks of a stage at its deepest (the slots per stage)."""
        return max(self.depth_choices)

    @property
    def num_stages(self) -> int:
        """Stages of the table (each a depth in an arch)."""
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
        """The middle (expanded) width of a block of ``in_ch`` inputs at expand ratio ``expand``."""
        return make_divisible(round(in_ch * expand), self.divisor)

    def se_channels(self, mid_ch: int) -> int:
        """The SE squeeze width of a block with ``mid_ch`` middle channels."""
        return squeeze_channels(mid_ch, self.se_reduction, self.divisor)

    def stem_size(self, resolution: int) -> int:
        """Side of the stem's output map (the first block's input) at ``resolution``."""
        return out_size(resolution, self.stem_stride)

    def first_block(self) -> BlockSpec:
        """The fixed first block (expand ratio 1, no SE) between the stem and the elastic slots."""
        return BlockSpec(in_ch=self.stem_width, mid_ch=self.stem_width, out_ch=self.first_block_width,
                         kernel=3, stride=1, act="relu", se=False, se_ch=0, expand_conv=False)

    # ---- the one walk over the supernet's slots -------------------------------
    def slots(self, resolution: int | None = None) -> list[Slot]:
        """Every elastic block slot in order, with its channels, stride and (at ``resolution``) map sizes."""
        out, in_ch = [], self.first_block_width
        size = 0 if resolution is None else self.stem_size(resolution)
        for s, stage in enumerate(self.stages):
            for j in range(self.max_depth):
                stride = stage.stride if j == 0 else 1
                next_size = out_size(size, stride) if size else 0
                out.append(Slot(s * self.max_depth + j, s, j, in_ch, stage, stride, size, next_size))
                in_ch, size = stage.width, next_size
        return out

    def block_at(self, slot: Slot, kernel: int, expand: int) -> BlockSpec:
        """The concrete block that ``slot`` holds for one kernel and expand ratio."""
        mid = self.mid_channels(slot.in_ch, expand)
        st = slot.spec
        return BlockSpec(in_ch=slot.in_ch, mid_ch=mid, out_ch=st.width, kernel=kernel, stride=slot.stride,
                         act=st.act, se=st.se, se_ch=self.se_channels(mid) if st.se else 0, expand_conv=True)

    def active_slots(self, arch: Arch) -> Iterator[tuple[Slot, int, int]]:
        """(slot, kernel, expand) for every active block of ``arch``, in order."""
        pairs = iter(zip(self.validate(arch).kernel, arch.expand))
        for slot in self.slots():
            if slot.active(arch.depth):
                yield (slot, *next(pairs))

    def slot_blocks(self, resolution: int | None = None) -> Iterator[tuple[Slot, int, int, BlockSpec]]:
        """(slot, kernel index, expand index, block) for every block a subnet can hold there: the per-slot tables."""
        for slot in self.slots(resolution):
            for ki, k in enumerate(self.kernel_choices):
                for ei, e in enumerate(self.expand_choices):
                    yield slot, ki, ei, self.block_at(slot, k, e)

    def head_size(self, resolution: int) -> int:
        """Side of the last stage's output map (the head's input) at ``resolution``, whatever the depths."""
        return self.slots(resolution)[-1].out_size

    def blocks(self, arch: Arch) -> list[BlockSpec]:
        """Every block of ``arch`` with channels resolved (the first, fixed block included)."""
        return [self.first_block()] + [self.block_at(slot, k, e) for slot, k, e in self.active_slots(arch)]

    # ---- validation ---------------------------------------------------------
    def validate(self, arch: Arch) -> Arch:
        """Return ``arch`` if it belongs to this space, else raise :class:`ArchError`."""
        if not isinstance(arch, Arch):
            raise ArchError(f"expected an Arch, got {type(arch).__name__}")
        if len(arch.depth) != self.num_stages:
            raise ArchError(f"depth must have {self.num_stages} entries (one per stage) in space "
                            f"{self.name!r}, got {len(arch.depth)}")
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
        """Parse an arch's JSON and check that it belongs to this space."""
        return self.validate(Arch.from_json(text))

    # ---- corner archs and sampling -----------------------------------------
    def _uniform(self, k: int, e: int, d: int, r: int) -> Arch:
        n = d * self.num_stages
        return Arch((k,) * n, (e,) * n, (d,) * self.num_stages, r)

    def largest(self, resolution: int | None = None) -> Arch:
        """The largest subnet: every choice at its largest (the resolution too, unless given one)."""
        return self._uniform(max(self.kernel_choices), max(self.expand_choices),
                             self.max_depth, resolution or max(self.resolutions))

    def smallest(self, resolution: int | None = None) -> Arch:
        """The smallest subnet (smallest choices everywhere), at the smallest resolution unless given one."""
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

    # ---- (de)serialisation ---------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """The space as plain JSON types (lists for tuples, dicts for stages)."""
        d = dataclasses.asdict(self)
        d["stages"] = [dataclasses.asdict(s) for s in self.stages]
        for key, value in d.items():
            if isinstance(value, tuple):
                d[key] = list(value)
        return d

    def to_json(self) -> str:
        """The canonical JSON form (sorted keys, no spaces): what :func:`space_digest` hashes."""
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "SearchSpace":
        """The space of :meth:`to_dict`'s form; unknown or malformed fields raise ``ValueError``."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown search-space fields {unknown}; allowed: {sorted(names)}")
        try:
            stages = tuple(StageSpec(**s) for s in data["stages"])
            return cls(**{**data, "stages": stages})
        except (KeyError, TypeError) as e:
            raise ValueError(f"malformed search space: {e}") from None


def space_digest(space: SearchSpace) -> str:
    """A space's id: the sha256 of its canonical JSON (tables and predictors name their space by it)."""
    return hashlib.sha256(space.to_json().encode()).hexdigest()


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
    """The registered space called ``name`` (``KeyError`` naming the known ones otherwise)."""
    try:
        return _SPACES[name]
    except KeyError:
        raise KeyError(f"unknown search space {name!r}; known: {space_names()}") from None


def space_names() -> list[str]:
    """The names of the registered spaces, sorted."""
    return sorted(_SPACES)


def _reference_mbv3(width_mult: float) -> SearchSpace:
    """The reference's OFAMobileNetV3 at ``width_mult``: its base widths scaled and rounded by its rule
    (:func:`make_divisible`, as the reference rounds), so that its checkpoints load as they are."""
    w = lambda c: make_divisible(c * width_mult)  # noqa: E731
    return SearchSpace(
        name="mbv3-imagenet" if width_mult == 1.0 else f"mbv3-imagenet-w{width_mult}", in_channels=3,
        num_classes=1000, resolutions=tuple(range(128, 225, 4)), stem_width=w(16), stem_stride=2,
        first_block_width=w(16), stages=(StageSpec(w(24), 2, "relu", False), StageSpec(w(40), 2, "relu", True),
                                         StageSpec(w(80), 2, "h_swish", False), StageSpec(w(112), 1, "h_swish", True),
                                         StageSpec(w(160), 2, "h_swish", True)),
        final_expand_width=w(960), head_width=w(1280),
        description=f"OFA-MobileNetV3 w{width_mult} (ImageNet, 128-224 px); checkpoint-compatible with the reference")


# The reference OFA-MobileNetV3 supernets, as in the paper's Table (its two released widths).
register_space(_reference_mbv3(1.0))
register_space(_reference_mbv3(1.2))

# Small images (Fashion-MNIST 28 px, CIFAR 32 px): a stride-1 stem of 8 channels and
# three downsamplings instead of five, so a 28 px input ends on a 4x4 map. Measured
# here (2 threads, batch 128 @28, channels_last): the largest subnet trains at ~230
# img/s and the smallest at ~1,300; 16-channel stems or wider stages cost 2x.
DEFAULT_SPACE = register_space(SearchSpace(
    name="mbv3-small-images", in_channels=1, num_classes=10, resolutions=(24, 28, 32),
    stem_width=8, stem_stride=1, first_block_width=8,
    stages=(
        StageSpec(16, 2, "relu", False),
        StageSpec(24, 2, "relu", True),
        StageSpec(40, 1, "h_swish", False),
        StageSpec(48, 1, "h_swish", True),
        StageSpec(64, 2, "h_swish", True),
    ),
    final_expand_width=384, head_width=512,
    description="MobileNetV3 blocks for 24-32 px inputs (Fashion-MNIST, CIFAR)",
)).name  # the default space: the command line's and the training config's
