"""Checkpoint compatibility with the reference implementation (PyPI ``ofa``).

The reference runs in its own process (its import name clashes with ours): it builds a
random-initialised OFAMobileNetV3 (widths 1.0 and 1.2) with non-trivial BN statistics and
kernel transforms, and writes its state dict, inputs and logits for several archs, and a
seeded random accuracy predictor with its predictions; we load the state dict and must
produce the same logits, and the predictor must predict the same.
"""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import jpeg_tree, reference_dir
from ofa.cli import main as ofa_main
from ofa.predict.accuracy import PredictorError
from ofa.predict.reference_predictor import from_reference
from ofa.reference import ReferenceImportError, load_reference_state_dict, reference_space
from ofa.space import Arch, get_space
from ofa.supernet import Supernet, extract

N_ARCHS = 12
WIDTHS = {1.0: "mbv3-imagenet", 1.2: "mbv3-imagenet-w1.2"}


@pytest.fixture(scope="module", params=sorted(WIDTHS), ids=lambda w: f"w{w}")
def dump(request, tmp_path_factory):
    out = tmp_path_factory.mktemp(f"reference-w{request.param}")
    script = Path(__file__).with_name("reference_dump.py")
    r = subprocess.run([sys.executable, str(script), str(reference_dir()), str(out), str(N_ARCHS), str(request.param)],
                       cwd="/", capture_output=True, text=True)
    assert r.returncode == 0, f"the reference dump exited with {r.returncode}: {r.stderr[-3000:]}"
    tensors = load_file(out / "reference.safetensors")
    state = {k: v for k, v in tensors.items() if not k.startswith("__")}
    return out, state, tensors, json.loads((out / "archs.json").read_text()), get_space(WIDTHS[request.param])


def test_reference_state_dict_gives_equal_logits(dump):
    _, state, tensors, records, space = dump
    assert len(state) == 475
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
    _, state, _, _, space = dump
    renamed = {"module." + k.replace(".conv.", ".mobile_inverted_conv.", 1) if k.startswith("blocks.") else k: v
               for k, v in state.items()}
    load_reference_state_dict(Supernet(space), renamed)
    assert reference_space(renamed) == space  # the width is found from the shapes


def test_mismatched_state_dicts_are_refused(dump):
    _, state, _, _, space = dump
    if space.name != "mbv3-imagenet":
        pytest.skip("the refusals are the same for every width")
    net = Supernet(space)
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


def test_import_reference_command_writes_the_weights_alone(dump, tmp_path):
    _, state, _, _, space = dump
    torch.save({"state_dict": state}, tmp_path / "ckpt.pth")
    out = tmp_path / "supernet.safetensors"
    assert ofa_main(["import-reference", "--checkpoint", str(tmp_path / "ckpt.pth"), "--out", str(out)]) == 0
    net = Supernet(space)
    net.load_state_dict(load_file(out))
    ref = load_reference_state_dict(Supernet(space), state)
    for (k, v), w in zip(net.state_dict().items(), ref.state_dict().values()):
        assert torch.equal(v, w), k


@pytest.mark.parametrize("layout", ["nas", "tutorial"])
def test_the_reference_accuracy_predictors_predict_as_in_the_reference(dump, layout):
    out, _, _, records, space = dump
    file, key = {"nas": ("acc_predictor.pth", "predicted_accuracy"),
                 "tutorial": ("acc_predictor_tutorial.pth", "tutorial_predicted_accuracy")}[layout]
    state = {k: v.numpy() for k, v in torch.load(out / file, weights_only=True).items()}
    pred = from_reference(state, space)
    archs = [space.arch_from_reference(r["ks"], r["e"], r["d"], r["r"]) for r in records]
    got = pred.predict(space, space.encode(archs))
    want = np.array([r[key] for r in records]) * 100
    assert np.abs(got - want).max() <= 1e-4 and want.std() > 0.01, (got, want)
    with pytest.raises(PredictorError, match="space 'mbv3-small-images'"):
        from_reference(state, get_space("mbv3-small-images"))
    with pytest.raises(PredictorError, match="not a reference AccuracyPredictor state dict"):
        from_reference(dict(list(state.items())[1:]), space)


_IMAGENET_FIRST_TWO = ("n01440764", "n01443537")  # an ImageFolder tree of two ImageNet classes


def test_an_imported_checkpoint_is_served_as_the_reference_serves_it(dump, tmp_path, caplog):
    """Import with a calibration folder and the reference predictor, serve, search under a MACs budget,
    fetch: the subnet's logits are those of the reference's get_active_subnet re-calibrated on the same
    batches, and the predicted accuracy is the reference predictor's."""
    import onnxruntime as ort

    from ofa.artifact import ArtifactError, load_artifact
    from ofa.calibrate import calibration_batches, served_images
    from ofa.export import read_subnet
    from ofa_client import Client
    from ofa_server.main import ServeConfig, Server
    from ofa_server.registry import Registry

    out, state, _, _, space = dump
    torch.save(state, tmp_path / "ckpt.pth")
    train = tmp_path / "train"
    jpeg_tree(train, _IMAGENET_FIRST_TWO, per_class=6)
    bare = tmp_path / "bare"
    assert ofa_main(["import-reference", "--checkpoint", str(tmp_path / "ckpt.pth"), "--out", str(bare)]) == 0
    with pytest.raises(ArtifactError, match=r"has no calibration set .*--calib-dir TRAIN_IMAGES"):
        Registry([str(bare)])
    art_dir = tmp_path / "imported"
    assert ofa_main(["import-reference", "--checkpoint", str(tmp_path / "ckpt.pth"), "--out", str(art_dir),
                     "--calib-dir", str(train), "--calib-images", "13", "--seed", "3",
                     "--accuracy-predictor", str(out / "acc_predictor.pth")]) == 0
    # 13 drawn: the 12 images, and the file that is none, skipped and counted
    assert "1 of the files drawn could not be read" in caplog.text and "holds 12 readable images" in caplog.text
    art = load_artifact(art_dir)
    assert art.space == space and art.calibration.shape == (12, 3, 224, 224)
    assert art.data.num_classes == 1000 and art.data.class_names[0] == "tench"
    srv = Server(Registry([str(art_dir)]), ServeConfig(port=0, max_searches=1)).start()
    try:
        with Client(f"127.0.0.1:{srv.port}", timeout=300) as c:
            (listed,) = c.supernets()
            assert listed["accuracy_predictor"]["family"] == "reference-mlp-3x400"
            best = c.search(max_macs=120_000_000, resolutions=[128])
            safetensors, onnx = c.fetch(best, "safetensors"), c.fetch(best, "onnx")
    finally:
        srv.stop(0)
    assert best.macs <= 120_000_000 and best.arch["resolution"] == 128
    arch = space.validate(Arch.from_dict(best.arch))
    x = torch.randn(2, 3, 128, 128, generator=torch.Generator().manual_seed(5))
    batches = [b.contiguous() for b in calibration_batches(served_images(art), art.data, 128)]
    inputs = {**state, "__input": x, **{f"__calib_{i}": b for i, b in enumerate(batches)}}
    save_file(inputs, tmp_path / "inputs.safetensors")
    width = next(w for w, n in WIDTHS.items() if n == space.name)
    subprocess.run([sys.executable, str(Path(__file__).with_name("reference_subnet.py")), str(reference_dir()),
                    str(tmp_path / "inputs.safetensors"), json.dumps(space.arch_to_reference(arch)), str(width),
                    str(out / "acc_predictor.pth"), str(tmp_path / "ref.json")], check=True, cwd="/")
    ref = json.loads((tmp_path / "ref.json").read_text())
    want = torch.tensor(ref["logits"])
    with torch.no_grad():
        got = read_subnet(safetensors.data)[0](x)
    session = ort.InferenceSession(onnx.data, providers=["CPUExecutionProvider"])
    got_onnx = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    assert want.abs().max() > 1e-3  # the comparison is not of zeros
    tol = 1e-4 + 1e-5 * float(want.abs().max())  # float32 rounding grows with the logits' scale (~50 here)
    assert (got - want).abs().max() <= tol and np.abs(got_onnx - want.numpy()).max() <= tol
    assert abs(best.predicted_accuracy - 100 * ref["predicted_accuracy"]) <= 1e-4


def test_an_imported_supernet_is_measured_on_an_image_folder_of_its_classes(tmp_path):
    """`ofa predictors --data-dir VAL` on an imported artifact: ImageNet's val tree, prepared as the reference
    evaluates; a tree of other classes, or none, is refused with the reason."""
    from PIL import Image

    from ofa.data import DataError
    from ofa.predict.measure import validation_set

    training = {"imported_from": "reference OFAMobileNetV3", "image_size": 224, "eval_crop": 0.875}
    with pytest.raises(DataError, match="data_dir is needed to measure an imported supernet"):
        validation_set(training, None)
    small = tmp_path / "two"
    jpeg_tree(small, _IMAGENET_FIRST_TWO, per_class=6).unlink()
    with pytest.raises(DataError, match="has 2 class folders; the supernet classifies 1000"):
        validation_set(training, str(small))
    val = tmp_path / "imagenet" / "val"
    for i in range(1000):
        (val / f"n{i:08d}").mkdir(parents=True)
        Image.new("RGB", (40 + i % 7, 32), (i % 256, 7 * i % 256, 0)).save(val / f"n{i:08d}" / "0.jpg")
    images, spec = validation_set(training, str(val.parent))  # the root holding val/, or val/ itself
    assert images.images.shape == (1000, 3, 224, 224) and images.labels.tolist() == list(range(1000))
    assert spec.num_classes == 1000 and spec.mean == (0.485, 0.456, 0.406)
