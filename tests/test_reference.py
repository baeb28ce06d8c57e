"""Checkpoint compatibility with the reference implementation (PyPI ``ofa``).

The reference runs in its own process (its import name clashes with ours): it builds a
random-initialised OFAMobileNetV3 with non-trivial BN statistics and kernel transforms,
and writes its state dict, inputs and logits for several archs; we load the state dict
and must produce the same logits.
"""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import reference_dir
from ofa.cli import main as ofa_main
from ofa.reference import ReferenceImportError, load_reference_state_dict
from ofa.space import get_space
from ofa.supernet import Supernet, extract

N_ARCHS = 12


@pytest.fixture(scope="module")
def dump(tmp_path_factory):
    out = tmp_path_factory.mktemp("reference")
    script = Path(__file__).with_name("reference_dump.py")
    subprocess.run([sys.executable, str(script), str(reference_dir()), str(out), str(N_ARCHS)],
                   check=True, cwd="/")
    tensors = load_file(out / "reference.safetensors")
    state = {k: v for k, v in tensors.items() if not k.startswith("__")}
    return out, state, tensors, json.loads((out / "archs.json").read_text())


def test_reference_state_dict_gives_equal_logits(dump):
    _, state, tensors, records = dump
    assert len(state) == 475
    space = get_space("mbv3-imagenet")
    net = load_reference_state_dict(Supernet(space), state).eval()
    assert len(records) >= 10
    for i, rec in enumerate(records):
        arch = space.arch_from_reference(rec["ks"], rec["e"], rec["d"], rec["r"])
        x, want = tensors[f"__input_{i}"], tensors[f"__logits_{i}"]
        with torch.no_grad():
            got = net(x, arch)
            got_static = extract(net, arch)(x)
        assert (got - want).abs().max() <= 1e-5, arch
        assert (got_static - want).abs().max() <= 1e-5, arch


def test_old_checkpoint_names_are_accepted(dump):
    _, state, _, _ = dump
    renamed = {"module." + k.replace(".conv.", ".mobile_inverted_conv.", 1) if k.startswith("blocks.") else k: v
               for k, v in state.items()}
    load_reference_state_dict(Supernet(get_space("mbv3-imagenet")), renamed)


def test_mismatched_state_dicts_are_refused(dump):
    _, state, _, _ = dump
    net = Supernet(get_space("mbv3-imagenet"))
    missing = dict(state)
    del missing["classifier.linear.bias"]
    with pytest.raises(ReferenceImportError, match="1 missing keys.*classifier.linear.bias"):
        load_reference_state_dict(net, missing)
    with pytest.raises(ReferenceImportError, match="1 unexpected keys.*extra"):
        load_reference_state_dict(net, {**state, "extra": torch.zeros(1)})
    wrong = {**state, "classifier.linear.bias": torch.zeros(10)}
    with pytest.raises(ReferenceImportError, match=r"classifier.linear.bias has shape \(10,\), expected \(1000,\)"):
        load_reference_state_dict(net, wrong)
    with pytest.raises(ReferenceImportError, match="space 'mbv3-small-images'"):
        load_reference_state_dict(Supernet(get_space("mbv3-small-images")), state)


def test_import_reference_command(dump, tmp_path):
    _, state, _, _ = dump
    torch.save({"state_dict": state}, tmp_path / "ckpt.pth")
    out = tmp_path / "supernet.safetensors"
    assert ofa_main(["import-reference", "--checkpoint", str(tmp_path / "ckpt.pth"), "--out", str(out)]) == 0
    net = Supernet(get_space("mbv3-imagenet"))
    net.load_state_dict(load_file(out))
    ref = load_reference_state_dict(Supernet(get_space("mbv3-imagenet")), state)
    for (k, v), w in zip(net.state_dict().items(), ref.state_dict().values()):
        assert torch.equal(v, w), k
