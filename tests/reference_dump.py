"""Run inside a process whose ``ofa`` is the reference package (PyPI ``ofa``).

Builds a random-initialised ``OFAMobileNetV3`` (k 3/5/7, e 3/4/6, d 2/3/4) of width WIDTH
(default 1.0), makes its BN statistics and kernel-transform matrices non-trivial so that
every part of the mapping is exercised, and writes its state dict, some archs, inputs and
its logits; and seeded random reference accuracy predictors (``ofa.nas``'s 3x400 MLP over the
arch encoding of the 25 resolutions, and the tutorial's, the layout of the released
``acc_predictor.pth``), their state dicts and their predictions for those archs.
Usage: python reference_dump.py REF_DIR OUT_DIR N_ARCHS [WIDTH]
"""
import json
import random
import sys

ref_dir, out_dir, n_archs = sys.argv[1], sys.argv[2], int(sys.argv[3])
width = float(sys.argv[4]) if len(sys.argv) > 4 else 1.0
sys.path.insert(0, ref_dir)

import ofa  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

if not ofa.__file__.startswith(ref_dir):
    sys.exit(f"expected the reference ofa from {ref_dir}, imported {ofa.__file__}")

from ofa.imagenet_classification.elastic_nn.networks import OFAMobileNetV3  # noqa: E402

torch.manual_seed(0)
random.seed(0)
net = OFAMobileNetV3(ks_list=[3, 5, 7], expand_ratio_list=[3, 4, 6], depth_list=[2, 3, 4], width_mult=width)
with torch.no_grad():
    for name, t in net.state_dict().items():
        if name.endswith("running_mean"):
            t.copy_(torch.randn_like(t) * 0.1)
        elif name.endswith("running_var"):
            t.copy_(torch.rand_like(t) + 0.5)
        elif name.endswith("_matrix"):
            t.add_(torch.randn_like(t) * 0.05)
        elif name.endswith("bn.weight") or name.endswith("bn.bn.weight"):
            t.copy_(torch.rand_like(t) + 0.5)
net.eval()

records = []
resolutions = list(range(128, 225, 4))
tensors = {k: v.contiguous() for k, v in net.state_dict().items()}
for i in range(n_archs):
    if i == 0:
        cfg = {"ks": [7] * 20, "e": [6] * 20, "d": [4] * 5}
    elif i == 1:
        cfg = {"ks": [3] * 20, "e": [3] * 20, "d": [2] * 5}
    else:
        cfg = net.sample_active_subnet()
    r = [224, 128][i] if i < 2 else random.choice(resolutions)
    net.set_active_subnet(ks=cfg["ks"], e=cfg["e"], d=cfg["d"])
    x = torch.randn(2, 3, r, r)
    with torch.no_grad():
        y = net(x)
    tensors[f"__input_{i}"] = x
    tensors[f"__logits_{i}"] = y
    records.append({"ks": cfg["ks"], "e": cfg["e"], "d": cfg["d"], "r": r})
save_file(tensors, f"{out_dir}/reference.safetensors")

from ofa.nas.accuracy_predictor import AccuracyPredictor, MobileNetArchEncoder  # noqa: E402

torch.manual_seed(1)
encoder = MobileNetArchEncoder(image_size_list=resolutions, ks_list=[3, 5, 7], expand_list=[3, 4, 6],
                               depth_list=[2, 3, 4])
predictor = AccuracyPredictor(encoder, hidden_size=400, n_layers=3, device="cpu")
with torch.no_grad():
    predictor.base_acc.fill_(0.78)
torch.save(predictor.state_dict(), f"{out_dir}/acc_predictor.pth")
with torch.no_grad():
    predicted = predictor.predict_acc([{"ks": r["ks"], "e": r["e"], "d": r["d"], "image_size": r["r"]}
                                       for r in records])
import importlib.util  # noqa: E402  (the module alone: ofa.tutorial's __init__ imports gdown, not installed)

_spec = importlib.util.spec_from_file_location("reference_tutorial_predictor",
                                               f"{ofa.__path__[0]}/tutorial/accuracy_predictor.py")
_tutorial = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_tutorial)
TutorialPredictor = _tutorial.AccuracyPredictor

torch.manual_seed(2)
tutorial = TutorialPredictor(pretrained=False, device="cpu")  # the layout of the released acc_predictor.pth
torch.save(tutorial.model.state_dict(), f"{out_dir}/acc_predictor_tutorial.pth")
tutorial_predicted = tutorial.predict_accuracy([{"ks": r["ks"], "e": r["e"], "d": r["d"], "r": [r["r"]]}
                                                for r in records]).reshape(-1)
for r, p, q in zip(records, predicted.tolist(), tutorial_predicted.tolist()):
    r["predicted_accuracy"], r["tutorial_predicted_accuracy"] = p, q
with open(f"{out_dir}/archs.json", "w") as f:
    json.dump(records, f)
