import dataclasses
import json

import numpy as np
import pytest

from ofa.space import (ArchError, SearchSpace, get_space, out_size, register_space, space_digest, space_names,
                       squeeze_channels)


def test_registry_has_both_spaces_and_refuses_duplicates():
    assert {"mbv3-imagenet", "mbv3-small-images"} <= set(space_names())
    with pytest.raises(ValueError, match="already registered"):
        register_space(get_space("mbv3-imagenet"))
    with pytest.raises(KeyError, match="known: .*mbv3-imagenet"):
        get_space("mbv3-huge")


def test_imagenet_space_is_the_reference_space():
    s = get_space("mbv3-imagenet")
    assert s.kernel_choices == (3, 5, 7) and s.expand_choices == (3, 4, 6)
    assert s.depth_choices == (2, 3, 4) and s.num_stages == 5 and s.max_depth == 4
    assert s.resolutions == tuple(range(128, 225, 4)) and s.num_classes == 1000
    assert [st.width for st in s.stages] == [24, 40, 80, 112, 160]
    assert [st.stride for st in s.stages] == [2, 2, 2, 1, 2]


def test_small_space_has_stride_one_stem():
    s = get_space("mbv3-small-images")
    assert s.stem_stride == 1 and s.in_channels == 1 and s.num_classes == 10
    def downsamplings(sp):
        return (sp.stem_stride == 2) + sum(st.stride == 2 for st in sp.stages)
    assert downsamplings(s) == 3 < downsamplings(get_space("mbv3-imagenet")) == 5


def test_json_round_trip_is_exact(space):
    for arch in space.sample(1, n=200) + [space.smallest(), space.largest()]:
        text = arch.to_json()
        back = space.arch_from_json(text)
        assert back == arch and back.to_json() == text and back.id == arch.id
        assert json.loads(text) == arch.to_dict()


def test_canonical_form_and_id_are_stable():
    arch = get_space("mbv3-imagenet").largest()
    assert arch.to_json().startswith('{"depth":[4,4,4,4,4],"expand":[6,6')
    assert arch.id == "a5c90933fb2f0d51"  # a change here breaks every stored subnet id


def test_sampling_is_seeded_and_covers_the_choices(space):
    a, b = space.sample(7, n=300), space.sample(7, n=300)
    assert a == b and space.sample(8, n=300) != a
    assert {k for x in a for k in x.kernel} == set(space.kernel_choices)
    assert {e for x in a for e in x.expand} == set(space.expand_choices)
    assert {d for x in a for d in x.depth} == set(space.depth_choices)
    assert {x.resolution for x in a} == set(space.resolutions)
    assert all(space.validate(x) is x for x in a)


def test_encoding_round_trip_and_latent_slots(space):
    archs = space.sample(3, n=1000)
    codes = space.encode(archs)
    assert codes.shape == (1000, space.code_length)
    assert space.decode(codes) == archs
    # slots past a stage's depth are ignored by decode: a search may keep values there
    noisy = codes.copy()
    inactive = ~np.concatenate([space.active_mask(codes)] * 2, axis=1)
    noisy[:, : 2 * space.num_slots][inactive] = 1
    assert space.decode(noisy) == archs
    bad = codes.copy()
    bad[0, -1] = len(space.resolutions)
    with pytest.raises(ArchError, match="out of range"):
        space.decode(bad)


def test_reference_form_round_trip(space):
    for arch in space.sample(5, n=50):
        ref = space.arch_to_reference(arch)
        assert len(ref["ks"]) == len(ref["e"]) == space.num_slots
        assert space.arch_from_reference(**ref) == arch


def _ok(space):
    return space.smallest()


@pytest.mark.parametrize("change, message", [
    (dict(kernel=(3,) * 9), r"kernel must list one value per active block: sum\(depth\) = 10, got 9"),
    (dict(expand=(3,) * 11), r"expand must list one value per active block"),
    (dict(kernel=(4,) + (3,) * 9), r"kernel\[0\] = 4 is not allowed; choose from \[3, 5, 7\]"),
    (dict(expand=(3,) * 9 + (8,)), r"expand\[9\] = 8 is not allowed; choose from \[3, 4, 6\]"),
    (dict(depth=(2, 2, 2, 2, 5), kernel=(3,) * 13, expand=(3,) * 13),
     r"depth\[4\] = 5 is not allowed; choose from \[2, 3, 4\]"),
    (dict(depth=(2, 2, 2, 2), kernel=(3,) * 8, expand=(3,) * 8), r"depth must have 5 entries"),
    (dict(depth=(2, 2, 2, 2, 0), kernel=(3,) * 8, expand=(3,) * 8), r"depth values must be >= 1"),
    (dict(resolution=130), r"resolution = 130 is not allowed; choose from 128\.\.224 in steps of 4"),
    (dict(resolution=224.0), r"resolution must be an integer"),
    (dict(resolution=True), r"resolution must be an integer"),
    (dict(kernel="3333333333"), r"kernel must be a list of integers"),
    (dict(kernel=(3.0,) * 10), r"kernel\[0\] must be an integer"),
    (dict(expand=None), r"expand must be a list of integers"),
])
def test_every_bad_arch_is_refused_with_a_clear_message(change, message):
    space = get_space("mbv3-imagenet")
    with pytest.raises(ArchError, match=message):
        space.validate(dataclasses.replace(_ok(space), **change))


@pytest.mark.parametrize("text, message", [
    ("{", "does not parse"),
    ("[1, 2]", "must be a JSON object"),
    ('{"kernel": [], "expand": [], "depth": []}', r"missing \['resolution'\]"),
    ('{"kernel": [], "expand": [], "depth": [], "resolution": 1, "width": 2}', r"unknown \['width'\]"),
])
def test_bad_arch_json_is_refused(text, message):
    with pytest.raises(ArchError, match=message):
        get_space("mbv3-imagenet").arch_from_json(text)


def test_arch_is_frozen_and_hashable():
    arch = get_space("mbv3-imagenet").smallest()
    with pytest.raises(dataclasses.FrozenInstanceError):
        arch.resolution = 224
    assert len({arch, dataclasses.replace(arch)}) == 1


def test_space_json_round_trip(space):
    back = SearchSpace.from_dict(json.loads(space.to_json()))
    assert back == space and back.to_json() == space.to_json()
    with pytest.raises(ValueError, match="unknown search-space fields"):
        SearchSpace.from_dict({**space.to_dict(), "colour": "blue"})


def test_blocks_resolve_channels_like_the_reference():
    space = get_space("mbv3-imagenet")
    blocks = space.blocks(space.largest())
    assert len(blocks) == 21 and blocks[0].in_ch == 16 and not blocks[0].expand_conv
    b = blocks[1]  # first block of stage 1: 16 -> 96 -> 24, stride 2
    assert (b.in_ch, b.mid_ch, b.out_ch, b.stride, b.residual) == (16, 96, 24, 2, False)
    se = blocks[5]  # first block of stage 2 (SE): mid 144, squeeze make_divisible(36) = 40
    assert (se.mid_ch, se.se_ch) == (144, 40) == (se.mid_ch, squeeze_channels(144))


def test_slot_walk_chains_channels_and_map_sizes(space):
    for r in space.resolutions:
        size, in_ch = space.stem_size(r), space.first_block_width
        slots = space.slots(r)
        assert [s.index for s in slots] == list(range(space.num_slots))
        for slot in slots:
            assert (slot.in_ch, slot.in_size) == (in_ch, size)
            assert slot.stride == (slot.spec.stride if slot.position == 0 else 1)
            assert slot.out_size == out_size(size, slot.stride)
            in_ch, size = slot.spec.width, slot.out_size
        assert space.head_size(r) == size


def test_active_slots_are_the_blocks_the_codes_use(space):
    for arch in space.sample(3, n=50):
        active = list(space.active_slots(arch))
        assert [s.index for s, _, _ in active] == np.flatnonzero(space.active_mask(space.encode([arch]))[0]).tolist()
        assert [(k, e) for _, k, e in active] == list(zip(arch.kernel, arch.expand))
        assert space.blocks(arch)[1:] == [space.block_at(s, k, e) for s, k, e in active]


# Stored latency tables and accuracy predictors name their space by this digest: it must not drift.
@pytest.mark.parametrize("name, digest", [("mbv3-imagenet", "9db92646c41df3bf"),
                                          ("mbv3-small-images", "030334a9166c77b6")])
def test_space_digest_is_stable(name, digest):
    assert space_digest(get_space(name))[:16] == digest


def test_space_digest_follows_the_definition(space):
    assert space_digest(SearchSpace.from_dict(space.to_dict())) == space_digest(space)
    assert space_digest(dataclasses.replace(space, num_classes=space.num_classes + 1)) != space_digest(space)
