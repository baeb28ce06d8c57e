import numpy as np

from ofa.predict import CostModel, count_macs_params
from ofa.space import get_space
from ofa.supernet import extract
from test_supernet import corner_and_random_archs


def test_analytic_cost_equals_counted_cost(space, supernets):
    net, cost = supernets[space.name], CostModel(space)
    archs = corner_and_random_archs(space, 20, seed=21)  # a formula wrong for some block shows on most archs
    macs, params = cost.of(archs)
    for arch, m, p in zip(archs, macs, params):
        counted = count_macs_params(extract(net, arch), (space.in_channels, arch.resolution, arch.resolution))
        assert counted == (m, p), arch


def test_reference_figures_for_the_imagenet_space():
    space, cost = get_space("mbv3-imagenet"), CostModel(get_space("mbv3-imagenet"))
    # PyPI ofa's counter: largest subnet ~566M MACs at 224, smallest ~41.5M at 128
    assert cost.arch_macs(space.largest(224)) == 566_170_656
    assert cost.arch_macs(space.smallest(128)) == 41_476_224


def test_cost_is_batched_and_ignores_latent_slots(space):
    cost = CostModel(space)
    archs = space.sample(0, n=5000)
    codes = space.encode(archs)
    macs, params = cost.macs(codes), cost.params(codes)
    assert macs.shape == params.shape == (5000,) and macs.dtype == np.int64
    noisy = codes.copy()
    noisy[noisy == -1] = 2
    assert np.array_equal(cost.macs(noisy), macs) and np.array_equal(cost.params(noisy), params)
    # monotone in every choice: the largest arch bounds every sample
    assert macs.max() <= cost.arch_macs(space.largest()) and macs.min() >= cost.arch_macs(space.smallest())
