"""Streaming image folders: batches decoded in DataLoader workers, the same whatever the workers or the start,
unreadable files counted and skipped, a resumed streaming run equal to an uninterrupted one."""
import logging
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import jpeg_tree
from ofa.data import DataError
from ofa.data import training_data
from ofa.folder import StepBatch, open_folder
from ofa.train import load_config, train
from ofa.train.loop import Trainer


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("jpegs")
    jpeg_tree(root / "train", [f"class{c}" for c in range(3)])
    return root


def _plan(steps, n: int = 6):
    return [StepBatch(s, list(range(s * n, s * n + n)), 24 + 4 * (s % 2), [1000 + 7 * s + j for j in range(n)])
            for s in steps]


def test_streamed_batches_do_not_depend_on_workers_or_where_they_start(folder):
    index = open_folder(folder / "train", workers=2)
    assert len(index) == 73 and index.classes == ("class0", "class1", "class2")
    two = [(sb.step, x, ok) for sb, x, ok in index.stream(_plan(range(6)))]
    none = [(sb.step, x, ok) for sb, x, ok in open_folder(folder / "train", workers=0).stream(_plan(range(6)))]
    later = [(sb.step, x, ok) for sb, x, ok in index.stream(_plan(range(3, 6)))]  # a resumed run's plan
    for (s, x, ok), (s2, x2, ok2) in zip(two, none):
        assert s == s2 and torch.equal(x, x2) and torch.equal(ok, ok2)
        assert x.dtype == torch.uint8 and x.shape[1:] == (3, 24 + 4 * (s % 2), 24 + 4 * (s % 2))
    for (s, x, _), (s2, x2, _) in zip(two[3:], later):
        assert s == s2 and torch.equal(x, x2)
    assert not torch.equal(two[0][1], two[2][1][:6])  # another step, other crops


def test_an_unreadable_file_is_left_out_and_counted(folder, caplog):
    index = open_folder(folder / "train", workers=2)
    broken = index.files.index(str(folder / "train" / "class0" / "999-broken.jpg"))
    plan = [StepBatch(0, [broken - 1, broken, broken + 1], 28, [1, 2, 3])]
    ((_, x, ok),) = list(index.stream(plan))
    assert ok.tolist() == [True, False, True] and x.shape == (2, 3, 28, 28)
    with caplog.at_level(logging.WARNING):
        kept = index.subset(torch.tensor([broken - 1, broken, broken + 1])).load(32)
    assert kept.images.shape == (2, 3, 32, 32) and "1 of 3 images could not be read" in caplog.text
    with pytest.raises(DataError, match="ImageFolder split not found"):
        open_folder(folder / "nowhere")


def _config(folder: Path, *extra: str):
    sets = [f"data_dir={folder}", "dataset=imagefolder", "data_mode=stream", "image_size=32", "val_size=12",
            "calib_size=8", "batch_size=16", "eval_batch_size=64", "log_every=2", "threads=2", "checkpoint_every=3",
            "loader_workers=2", "evaluate_phases=last", "phases.full.epochs=2"]
    sets += [f"phases.{p}.epochs=0.3" for p in ("kernel", "depth-1", "depth-2", "expand-1", "expand-2")]
    return load_config("quick", None, sets + list(extra))


def test_data_mode_is_chosen_by_size_unless_told(folder):
    index, spec = training_data("imagefolder", str(folder), "stream", 32, 2)
    assert len(index) == 73 and spec.num_classes == 3 and spec.channels == 3
    in_memory, _ = training_data("imagefolder", str(folder), "auto", 32, 2)  # 73 images: far below 4 GiB
    assert in_memory.images.shape[1:] == (3, 32, 32)
    with pytest.raises(Exception, match="data_mode 'stream' reads an imagefolder dataset"):
        train(load_config("quick", None, ["data_mode=stream"]), folder / "x", progress=False)


def test_a_resumed_streaming_run_equals_an_uninterrupted_one(folder, tmp_path, monkeypatch, caplog):
    with caplog.at_level(logging.WARNING):
        train(_config(folder), tmp_path / "whole", progress=False)
    assert "unreadable" in caplog.text or "could not be read" in caplog.text  # counted, wherever it fell
    real_step = Trainer._step

    def interrupted(self, run, step):
        if run.index == 0 and step == 5:  # after the checkpoint at step 3, mid-phase
            raise KeyboardInterrupt
        return real_step(self, run, step)

    monkeypatch.setattr(Trainer, "_step", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train(_config(folder), tmp_path / "cut", progress=False)
    monkeypatch.setattr(Trainer, "_step", real_step)
    train(_config(folder), tmp_path / "cut", resume=True, progress=False)
    want, got = (load_file(str(d / "supernet.safetensors")) for d in (tmp_path / "whole", tmp_path / "cut"))
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
