"""Transfer (``init_from``): a training run that starts from a supernet that exists, an artifact
of ours or a reference checkpoint, with a fresh classifier (and first conv, for other channels)."""
import dataclasses
import json

import pytest
import torch

from conftest import tiny_args
from ofa.artifact import METRICS_LOG, load_artifact
from ofa.cli import main as ofa_main
from ofa.reference import reference_key_map
from ofa.space import get_space
from ofa.supernet import Supernet
from ofa.train.config import ConfigError
from ofa.train.transfer import FRESH_CLASSIFIER, FRESH_STEM, init_from, load_source


def _transfer_args(data_dir) -> list[str]:
    """The transfer preset cut to a few steps a phase on the tiny dataset."""
    return ([a for a in tiny_args(data_dir) if not a.startswith("phases.")]
            + ["phases.full.epochs=0.4", "phases.elastic.epochs=0.4"])


def _copied(target: Supernet, source: dict, fresh) -> None:
    """Every tensor of ``target`` equals the source's but the ``fresh`` ones (another shape, or other values)."""
    for key, tensor in target.state_dict().items():
        assert (key not in fresh) == (tensor.shape == source[key].shape and torch.equal(tensor, source[key])), key


def test_init_from_an_artifact_copies_all_but_the_classifier_and_a_stem_of_other_channels(tiny_artifact):
    art = load_artifact(tiny_artifact)
    source = art.supernet.state_dict()
    same = Supernet(dataclasses.replace(art.space, num_classes=5))
    record = init_from(same, load_source(tiny_artifact, same.space))
    assert record["fresh"] == list(FRESH_CLASSIFIER) and same.head.classifier.weight.shape[0] == 5
    _copied(same, source, FRESH_CLASSIFIER)
    rgb = Supernet(dataclasses.replace(art.space, in_channels=3, name="rgb"))
    record = init_from(rgb, load_source(tiny_artifact, rgb.space))
    assert record["fresh"] == list(FRESH_CLASSIFIER + FRESH_STEM) and rgb.stem.conv.weight.shape[1] == 3
    _copied(rgb, source, FRESH_CLASSIFIER + FRESH_STEM)
    assert torch.equal(rgb.stem.bn.weight, source["stem.bn.weight"])  # only the conv is fresh
    assert record["copied"] == len(source) - 3


def test_init_from_a_reference_checkpoint(tmp_path):
    space = get_space("mbv3-imagenet")
    torch.manual_seed(3)
    theirs = Supernet(space)
    ours_to_theirs = reference_key_map(theirs)
    path = tmp_path / "ofa_mbv3.pth"
    torch.save({"state_dict": {t: theirs.state_dict()[o] for o, t in ours_to_theirs.items()}}, path)
    target = Supernet(dataclasses.replace(space, num_classes=37, resolutions=(160, 192), name="pets"))
    record = init_from(target, load_source(path, target.space))
    assert record["source"].startswith("reference checkpoint") and record["source_space"] == "mbv3-imagenet"
    _copied(target, theirs.state_dict(), FRESH_CLASSIFIER)


def test_init_from_refuses_other_blocks_and_what_is_no_supernet(tiny_artifact, tmp_path):
    with pytest.raises(ConfigError, match=r"init_from artifact .* has space 'mbv3-small-images@24-28px', whose blocks differ "
                                          r"from this run's 'mbv3-imagenet' in .*stem_width \(8 vs 16\).*stages \(\[16/2/relu, 24/2/relu\+se.*"
                                          r"train with space=mbv3-small-images \(--space\)"):
        load_source(tiny_artifact, get_space("mbv3-imagenet"))
    with pytest.raises(ConfigError, match="neither an artifact folder nor a reference checkpoint"):
        load_source(tmp_path / "missing", get_space("mbv3-small-images"))
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match="init_from .*cannot be read as a torch state dict"):
        load_source(junk, get_space("mbv3-small-images"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ConfigError, match="init_from "):
        load_source(empty, get_space("mbv3-small-images"))


def test_ofa_train_init_from_refuses_a_space_that_does_not_match_before_reading_data(tiny_artifact, tmp_path, capsys):
    code = ofa_main(["train", "--preset", "transfer", "--out", str(tmp_path / "t"), "--init-from", str(tiny_artifact),
                     "--space", "mbv3-imagenet", "--data-dir", str(tmp_path / "no-data-here"), "--no-progress"])
    assert code == 2
    err = capsys.readouterr().err
    assert "whose blocks differ from this run's 'mbv3-imagenet'" in err and "space=mbv3-small-images" in err
    assert not (tmp_path / "t").exists()


def test_ofa_train_init_from_runs_the_transfer_preset(tiny_artifact, tiny_data, tmp_path, capsys):
    out = tmp_path / "t"
    args = ["train", "--preset", "transfer", "--out", str(out), "--init-from", str(tiny_artifact), "--no-progress"]
    for a in _transfer_args(tiny_data):
        args += ["--set", a]
    assert ofa_main(args) == 0
    summary = json.loads(capsys.readouterr().out)
    assert set(summary["val_accuracy"]) == {"full", "elastic"}
    events = [json.loads(line) for line in (out / METRICS_LOG).read_text().splitlines()]
    started = [e for e in events if e.get("event") == "init_from"]
    assert len(started) == 1 and started[0]["fresh"] == list(FRESH_CLASSIFIER)
    art = load_artifact(out)
    assert art.manifest["training"]["init_from"] == str(tiny_artifact)
    source = load_artifact(tiny_artifact).space
    assert art.space.stages == source.stages and art.space.resolutions == get_space("mbv3-small-images").resolutions
