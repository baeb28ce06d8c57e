"""Reading Fashion-MNIST's idx files, and the in-memory augmentation."""
import gzip
import shutil

import pytest
import torch
import torch.nn.functional as F

from conftest import write_idx_dataset
from ofa.data import DataError, augment, load_dataset


def test_fashion_mnist_is_read_gzipped_plain_or_in_torchvisions_layout(tmp_path):
    data = write_idx_dataset(tmp_path / "gz", n_train=30, n_test=20)
    images, spec = load_dataset("fashion-mnist", data)
    test, _ = load_dataset("fashion-mnist", data, train=False)
    assert images.images.shape == (30, 1, 28, 28) and images.images.dtype == torch.uint8
    assert images.labels.dtype == torch.long and len(test) == 20 and spec.class_names[0] == "T-shirt/top"
    with gzip.open(data / "train-images-idx3-ubyte.gz") as f:  # the bytes as stored, after the 16-byte header
        assert images.images.flatten().tolist() == list(f.read()[16:])
    raw = tmp_path / "tv" / "FashionMNIST" / "raw"  # torchvision's layout, unpacked
    raw.mkdir(parents=True)
    for p in data.iterdir():
        with gzip.open(p) as f:
            (raw / p.name.removesuffix(".gz")).write_bytes(f.read())
    again, _ = load_dataset("fashion-mnist", tmp_path / "tv")
    assert torch.equal(again.images, images.images) and torch.equal(again.labels, images.labels)


def test_missing_and_malformed_data_say_where_they_looked(tmp_path):
    with pytest.raises(DataError, match=f"data_dir {tmp_path / 'nope'} does not exist"):
        load_dataset("fashion-mnist", tmp_path / "nope")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match=f"Fashion-MNIST not found in {empty}: expected train-images-idx3-ubyte"):
        load_dataset("fashion-mnist", empty)
    bad = write_idx_dataset(tmp_path / "bad", n_train=10, n_test=10)
    shutil.copy(bad / "train-images-idx3-ubyte.gz", tmp_path / "good.gz")
    (bad / "train-images-idx3-ubyte.gz").write_bytes(b"not gzip at all")
    with pytest.raises(DataError, match=r"could not decompress .*train-images-idx3-ubyte.gz: Not a gzipped file"):
        load_dataset("fashion-mnist", bad)
    with gzip.open(tmp_path / "good.gz") as f:
        stored = f.read()
    for broken, says in ((stored[:-5], "is not an idx file"), (b"\x00\x00\x0d\x03" + stored[4:], "header says 00000d03"),
                         (stored[:2], "is not an idx file")):  # cut short; floats, not bytes; no header
        (bad / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(broken))
        with pytest.raises(DataError, match=says):
            load_dataset("fashion-mnist", bad)
    (bad / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(stored))
    (bad / "train-labels-idx1-ubyte.gz").write_bytes(gzip.compress(b"\x00\x00\x08\x01" + (3).to_bytes(4, "big") + b"abc"))
    with pytest.raises(DataError, match=r"\(10, 28, 28\) images against \(3,\) labels"):
        load_dataset("fashion-mnist", bad)
    with pytest.raises(DataError, match=r"unknown dataset 'mnist'; choose from \['fashion-mnist'"):
        load_dataset("mnist", tmp_path)
    with pytest.raises(DataError, match="CIFAR-10 not found: expected"):
        load_dataset("cifar10", empty)
    with pytest.raises(DataError, match="ImageFolder split not found"):
        load_dataset("imagefolder", empty)


def test_augment_crops_each_image_from_its_zero_padded_self_and_flips_some():
    x = torch.randint(1, 256, (64, 3, 7, 9), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)  # no zeros in x: padding shows as 0
    y = augment(x, 2, True)
    assert y.shape == x.shape and y.dtype == torch.uint8
    padded, seen = F.pad(x, (2,) * 4), set()
    for i in range(len(x)):
        hits = [(dy, dx, flip) for dy in range(5) for dx in range(5) for flip in (False, True)
                if torch.equal(y[i], (lambda w: w.flip(-1) if flip else w)(padded[i, :, dy:dy + 7, dx:dx + 9]))]
        assert hits, i
        seen.update(hits)
    # each image its own draw: offsets and flips vary across the batch
    assert len({(dy, dx) for dy, dx, _ in seen}) >= 10 and {f for _, _, f in seen} == {False, True}
    torch.manual_seed(0)
    assert torch.equal(augment(x, 2, True), y)  # torch's global generator: seeded, as the trainer seeds each step
    assert torch.equal(augment(x, 0, False), x)
