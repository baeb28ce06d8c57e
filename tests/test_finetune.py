"""``ofa finetune``: one subnet trained further with distillation, recorded in the artifact, and served
in place of the extracted one (the server says so); its file loads through the client."""
import contextlib
import io
import json

import numpy as np
import pytest
import torch

from conftest import served_copy
from ofa.artifact import finetuned_file, load_artifact, open_artifact
from ofa.calibrate import served_images, served_subnet
from ofa.cli import main as ofa_main
from ofa.data import prepare_batch
from ofa.export import read_subnet
from ofa_client import Client, Weights
from ofa_server.main import ServeConfig, Server
from ofa_server.registry import Registry

TARGET = "synthetic-cpu"


@pytest.fixture(scope="module")
def tuned(tiny_artifact, tmp_path_factory):
    """A served copy of the tiny artifact with its smallest subnet fine-tuned for one epoch (the CLI's summary)."""
    art = served_copy(tiny_artifact, tmp_path_factory.mktemp("finetune") / "tiny", TARGET)
    out = art.parent / "smallest.safetensors"
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        code = ofa_main(["finetune", "--artifact", str(art), "--id", load_artifact(art).space.smallest().id,
                         "--epochs", "1", "--batch-size", "32", "--threads", "2", "--out", str(out), "--no-progress"])
    assert code == 0
    return art, out, json.loads(buf.getvalue())


def test_finetune_records_a_subnet_file_in_the_artifact(tuned):
    art, out, summary = tuned
    files = open_artifact(art)
    sid = summary["id"]
    assert summary["recorded_as"] == finetuned_file(sid) and files.finetuned() == {sid: finetuned_file(sid)}
    assert files.read(finetuned_file(sid)) == out.read_bytes()
    module, meta = read_subnet(out.read_bytes())
    assert meta["finetuned"]["epochs"] == 1 and meta["supernet_digest"] == files.digest
    assert summary["steps"] == -(-summary["train_images"] // 32) and len(summary["losses"]) == 1
    for key in ("val_accuracy_before", "val_accuracy_after", "test_accuracy_before", "test_accuracy_after"):
        assert 0 <= summary[key] <= 100
    # the subnet changed: it is not the one extracted and served from the shared weights any more
    loaded = load_artifact(art)
    extracted = served_subnet(loaded.supernet, module.arch, served_images(loaded), loaded.data)
    assert any(not torch.equal(a, b) for a, b in zip(module.state_dict().values(), extracted.state_dict().values()))


def test_the_server_serves_the_fine_tuned_subnet_and_says_so(tuned, tmp_path):
    art, out, summary = tuned
    registry = Registry([str(art)], str(tmp_path / "targets"))
    srv = Server(registry, ServeConfig(port=0, max_searches=1)).start()
    try:
        with Client(f"127.0.0.1:{srv.port}", timeout=60) as c:
            w = c.fetch(summary["id"], "safetensors")  # by id alone: the server knows its fine-tuned subnets
            assert w.fine_tuned and w.data == out.read_bytes()
            module = w.load_module()  # the client's loader round-trips the fine-tuned file
            onnx = c.fetch(summary["id"], "onnx")
            assert onnx.fine_tuned
            loaded = load_artifact(art)
            x = prepare_batch(loaded.calibration[:8], summary["arch"]["resolution"], loaded.data, "cpu",
                              channels_last=False)
            import onnxruntime as ort

            got = ort.InferenceSession(onnx.data, providers=["CPUExecutionProvider"]).run(None, {"image": x.numpy()})[0]
            with torch.no_grad():
                want = module(x).numpy()
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
            # a subnet it holds no fine-tuned file of is the extracted one, and says so
            other = c.search(TARGET, seed=1)
            if other.id != summary["id"]:
                assert not other.fine_tuned and not c.fetch(other, "safetensors").fine_tuned
    finally:
        srv.stop(0)
    # the file as the client wrote it loads again as a Weights value would
    again = Weights(out.read_bytes(), "safetensors", w.sha256, w.subnet_id, w.arch, w.input_shape, w.mean, w.std,
                    w.supernet_digest, True).load_module()
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), module.state_dict().values()))


def test_ofa_info_lists_the_fine_tuned_subnet(tuned, capsys):
    art, _, summary = tuned
    assert ofa_main(["info", "--artifact", str(art)]) == 0
    assert f"fine-tuned subnet {summary['id']} (served in place of the extracted one): epochs 1," in capsys.readouterr().out


def test_finetune_refuses_what_it_cannot_run(tuned, tmp_path, capsys):
    art, _, _ = tuned
    out = str(tmp_path / "x.safetensors")
    assert ofa_main(["finetune", "--artifact", str(art), "--id", "nope", "--epochs", "1", "--out", out]) == 2
    assert "--id 'nope' is not a subnet this artifact knows" in capsys.readouterr().err
    smallest = load_artifact(art).space.smallest().id
    assert ofa_main(["finetune", "--artifact", str(art), "--id", smallest, "--epochs", "0", "--out", out]) == 2
    assert "--epochs must be an integer >= 1" in capsys.readouterr().err
