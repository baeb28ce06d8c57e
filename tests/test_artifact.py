"""An artifact write killed at any moment leaves an artifact that loads: the old one or the new one."""
import json
import logging
import os
import shutil

import pytest
import torch

from ofa.artifact import PENDING, add_file, load_artifact, write_artifact
from ofa.train.checkpoint import load_checkpoint, save_checkpoint

# the file-system calls of a commit: a kill just before any one of them is a moment to try
CALLS = ("fsync", "replace", "unlink", "link")


def _killed_at(k: int, write) -> bool:
    """Run ``write()`` in a forked child that dies (os._exit, as SIGKILL: no cleanup runs) just before its
    k-th file-system call; True if it got that far, False if it finished first."""
    pid = os.fork()
    if pid == 0:  # the child
        count = [0]

        def hooked(real):
            def call(*args, **kwargs):
                count[0] += 1
                if count[0] == k:
                    os._exit(9)
                return real(*args, **kwargs)
            return call

        for name in CALLS:
            setattr(os, name, hooked(getattr(os, name)))
        try:
            write()
        except BaseException:  # noqa: BLE001 - any failure is the parent's to see
            os._exit(1)
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    assert code in (0, 9), f"the write failed in the child (exit code {code})"
    return code == 9


def _leftovers(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")
                  if p.name.endswith(".tmp") or p.name == PENDING)


def _kill_everywhere(tmp_path, source, write, is_new, caplog):
    """Kill ``write`` before each of its file-system calls in turn, on a fresh copy each time; every copy
    must load afterwards, old or new, repaired with a log line when needed, with no temporary file left."""
    outcomes = []
    for k in range(1, 200):
        folder = tmp_path / f"k{k}"
        shutil.copytree(source, folder)
        if not _killed_at(k, lambda: write(folder)):
            shutil.rmtree(folder)
            break
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="ofa"):
            art = load_artifact(folder)
        repaired = [r.getMessage() for r in caplog.records if "interrupted write" in r.getMessage()]
        assert not _leftovers(folder), (k, _leftovers(folder))
        outcomes.append(("new" if is_new(art) else "old", bool(repaired)))
        shutil.rmtree(folder)
    else:
        pytest.fail("the write never finished")
    # a kill before the commit point leaves staged files behind, and the load says it removed them
    assert k > 5 and {s for s, _ in outcomes} == {"old", "new"} and all(r for s, r in outcomes if s == "old")
    # once the commit point is passed the new artifact is what loads: no "old" after the first "new"
    states = [s for s, _ in outcomes]
    assert "old" not in states[states.index("new"):], outcomes


def test_adding_a_file_killed_at_any_moment_loads_old_or_new(tiny_artifact, tmp_path, caplog):
    text = json.dumps({"hello": "table"})
    _kill_everywhere(tmp_path, tiny_artifact, lambda f: add_file(f, "latency/new.json", text),
                     lambda art: "latency/new.json" in art.manifest["files"], caplog)


def test_writing_the_artifact_killed_at_any_moment_loads_old_or_new(tiny_artifact, tmp_path, caplog):
    art = load_artifact(tiny_artifact)
    old_digest = art.digest
    with torch.no_grad():
        next(art.supernet.parameters()).add_(1.0)  # new weights

    def write(folder):
        write_artifact(folder, art.supernet, art.data, art.calibration, art.manifest["training"],
                       art.manifest["metrics"])

    _kill_everywhere(tmp_path, tiny_artifact, write, lambda a: a.digest != old_digest, caplog)


def test_a_read_only_copy_that_needs_repair_says_so(tiny_artifact, tmp_path, monkeypatch):
    import errno

    import ofa.artifact

    folder = tmp_path / "ro"
    shutil.copytree(tiny_artifact, folder)
    (folder / ".space.json.abc.tmp").write_text("half")

    def read_only(folder):  # what removing the leftover meets on a read-only mount (root writes a 0o555 folder)
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(ofa.artifact, "_repair", read_only)
    with pytest.raises(ValueError, match="needs repair, which needs write access"):
        load_artifact(folder)
    monkeypatch.undo()
    assert load_artifact(folder).digest and not list(folder.glob(".*.tmp"))  # writable again: repaired


def test_a_checkpoint_save_removes_temp_files_of_a_killed_one(tmp_path):
    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / ".model-00000003.safetensors.x1y2.tmp").write_bytes(b"half a file")
    state = {"global_step": 4, "phase_index": 0, "step_in_phase": 4}
    save_checkpoint(folder, state, {"w": torch.ones(2)}, {"w": torch.zeros(2)})
    assert not list(folder.glob("*.tmp")) and load_checkpoint(folder).state["global_step"] == 4
