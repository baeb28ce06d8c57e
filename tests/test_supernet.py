import threading

import pytest
import torch
import torch.nn.functional as F

from conftest import perturb
from ofa.space import get_space
from ofa.subnet import SubNet, load_subnet
from ofa.supernet import Supernet, extract

N_ARCHS = 30


def corner_and_random_archs(space, n, seed):
    """Smallest and largest at both resolution ends, then seeded random archs."""
    lo, hi = min(space.resolutions), max(space.resolutions)
    archs = [space.smallest(lo), space.largest(hi), space.smallest(hi), space.largest(lo)]
    return archs + space.sample(seed, n=n - len(archs))


def max_diff(net, arch, batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, net.space.in_channels, arch.resolution, arch.resolution, generator=g)
    sub = extract(net, arch)
    assert isinstance(sub, SubNet) and not sub.training
    with torch.no_grad():
        want = net(x, arch)
        got = sub(x)
    assert want.abs().max() > 1e-3  # not a degenerate comparison
    return (want - got).abs().max().item()


def test_extracted_subnets_equal_the_supernet(space, supernets):
    net = supernets[space.name]
    archs = corner_and_random_archs(space, N_ARCHS, seed=11)
    assert len({a.resolution for a in archs}) >= 3
    diffs = [max_diff(net, a) for a in archs]
    assert max(diffs) <= 1e-5, f"worst arch {archs[diffs.index(max(diffs))]}: {max(diffs)}"


def test_extraction_stays_exact_after_training_steps(space):
    torch.manual_seed(1)
    net = perturb(Supernet(space), seed=1).train()
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    stats = {n: b.clone() for n, b in net.named_buffers() if n.endswith("running_mean")}
    for arch in corner_and_random_archs(space, 6, seed=2):
        x = torch.randn(4, space.in_channels, arch.resolution, arch.resolution)
        loss = torch.nn.functional.cross_entropy(net(x, arch), torch.randint(0, space.num_classes, (4,)))
        opt.zero_grad()
        loss.backward()
        opt.step()
    # the transforms learned something and BN statistics moved
    assert any((p - torch.eye(p.shape[0])).abs().max() > 0.05
               for n, p in net.named_parameters() if "transform_" in n)
    assert any(not torch.equal(stats[n], b) for n, b in net.named_buffers() if n in stats)
    net.eval()
    diffs = [max_diff(net, a) for a in corner_and_random_archs(space, 12, seed=3)]
    assert max(diffs) <= 1e-5


def test_extracted_subnet_holds_copies(supernets):
    net = supernets["mbv3-small-images"]
    sub = extract(net, net.space.largest())
    with torch.no_grad():
        sub.stem.conv.weight.add_(1.0)
    assert not torch.equal(sub.stem.conv.weight, net.stem.conv.weight)


def test_static_subnet_rebuilds_from_its_state_dict(supernets):
    net = supernets["mbv3-small-images"]
    arch = net.space.sample(4)
    sub = extract(net, arch)
    again = load_subnet(net.space, arch, sub.state_dict())
    x = torch.randn(2, 1, arch.resolution, arch.resolution)
    with torch.no_grad():
        assert torch.equal(sub(x), again(x))
    other = net.space.sample(5)
    with pytest.raises(ValueError, match="does not fit arch|has shape"):
        load_subnet(net.space, other, sub.state_dict())
    from safetensors.torch import save

    from ofa.export import read_subnet, subnet_metadata, write_safetensors

    meta = subnet_metadata(arch, net.space, {}, "0" * 64, 1)
    data = write_safetensors(sub, meta)
    assert read_subnet(data)[1]["arch"] == arch.to_dict()
    with pytest.raises(ValueError, match="not a served subnet safetensors file"):
        read_subnet(data[:-10])  # truncated
    doubled = {k: v.double() if v.is_floating_point() else v.contiguous() for k, v in sub.state_dict().items()}
    with pytest.raises(ValueError, match="has dtype torch.float64, expected torch.float32"):
        read_subnet(save(doubled, metadata={"ofa": meta}))
    newer = meta.replace('"version":1', '"version":2')
    with pytest.raises(ValueError, match="format 'ofa-subnet' version 2; this build reads 'ofa-subnet' version 1"):
        read_subnet(write_safetensors(sub, newer))


def test_concurrent_calls_with_different_archs(supernets):
    net = supernets["mbv3-imagenet"]
    space = net.space
    archs = [space.largest(160), space.smallest(160)] + space.sample(9, n=4, resolution=160)
    x = torch.randn(2, 3, 160, 160)
    with torch.no_grad():
        expected = [net(x, a) for a in archs]
    results: dict[int, list[torch.Tensor]] = {0: [], 1: []}
    barrier = threading.Barrier(2)

    def worker(tid: int) -> None:
        order = archs if tid == 0 else archs[::-1]
        barrier.wait()
        with torch.no_grad():
            for _ in range(3):
                for a in order:
                    results[tid].append((a, net(x, a)))

    threads = [threading.Thread(target=worker, args=(t,)) for t in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for tid in (0, 1):
        assert len(results[tid]) == 3 * len(archs)
        for a, y in results[tid]:
            assert torch.equal(y, expected[archs.index(a)])


def test_kernel_transform_starts_as_centre_crop():
    space = get_space("mbv3-small-images")
    torch.manual_seed(0)
    block = Supernet(space).blocks[0]
    w7 = block.depthwise.weight
    assert torch.equal(block.depthwise.active_weight(8, 5), w7[:8, :, 1:6, 1:6])
    assert torch.equal(block.depthwise.active_weight(8, 3), w7[:8, :, 2:5, 2:5])


def test_reordering_channels_keeps_the_largest_subnet(space):
    torch.manual_seed(2)
    net = perturb(Supernet(space), seed=2).eval()
    arch = space.largest()
    x = torch.randn(2, space.in_channels, arch.resolution, arch.resolution)
    with torch.no_grad():
        before = net(x, arch)
        small_before = net(x, space.smallest(arch.resolution))
        net.reorder_channels()
        after = net(x, arch)
    assert (before - after).abs().max() <= 1e-5
    # smaller expand ratios now keep the most important channels, a different function
    with torch.no_grad():
        assert not torch.allclose(small_before, net(x, space.smallest(arch.resolution)))
    for block in net.blocks:
        importance = block.project.weight.abs().sum(dim=(0, 2, 3))
        assert torch.all(importance[:-1] >= importance[1:])


def test_invalid_arch_is_refused_by_forward(supernets):
    net = supernets["mbv3-small-images"]
    bad = get_space("mbv3-imagenet").smallest()
    with pytest.raises(ValueError, match="resolution = 128 is not allowed"):
        net(torch.randn(1, 1, 28, 28), bad)


@pytest.mark.parametrize("channels, size, kernel, stride", [(96, 6, 7, 1), (96, 6, 7, 2), (64, 3, 5, 1), (32, 4, 7, 1)])
def test_the_small_map_depthwise_gradient_equals_torchs(channels, size, kernel, stride):
    from ofa.layers import depthwise_conv

    torch.manual_seed(0)
    x = torch.randn(8, channels, size, size).to(memory_format=torch.channels_last).requires_grad_()
    w = torch.randn(channels, 1, kernel, kernel, requires_grad=True)
    g = torch.randn_like(F.conv2d(x, w, None, stride, kernel // 2, 1, channels))
    ours = torch.autograd.grad(depthwise_conv(x, w, stride), (x, w), g)
    ref = torch.autograd.grad(F.conv2d(x, w, None, stride, kernel // 2, 1, channels), (x, w), g)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
