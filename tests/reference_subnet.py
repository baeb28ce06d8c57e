"""Run inside a process whose ``ofa`` is the reference package (PyPI ``ofa``): one subnet as the reference
serves it, re-calibrated on given batches, and its logits.

Loads an ``OFAMobileNetV3`` of width WIDTH from the state dict in IN (safetensors), activates the arch
(reference form: ks, e, d, r) and takes ``get_active_subnet(preserve_weight=True)``; resets every BN's
statistics and re-estimates them as a cumulative average (``momentum=None``) over the float batches
``calib_0``, ``calib_1``, ... of IN, in that order and in channels_last memory (the recalibration the
server applies, on the same tensors); then writes its logits for IN's ``input``, and the reference accuracy predictor's prediction for
the arch (from PRED, a state dict .pth), to OUT (JSON).
Usage: python reference_subnet.py REF_DIR IN ARCH_JSON WIDTH PRED OUT
"""
import json
import sys

ref_dir, inputs, arch_json, width, pred_path, out = sys.argv[1:7]
sys.path.insert(0, ref_dir)

import ofa  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

if not ofa.__file__.startswith(ref_dir):
    sys.exit(f"expected the reference ofa from {ref_dir}, imported {ofa.__file__}")

from ofa.imagenet_classification.elastic_nn.networks import OFAMobileNetV3  # noqa: E402
from ofa.nas.accuracy_predictor import AccuracyPredictor, MobileNetArchEncoder  # noqa: E402

tensors = load_file(inputs)
arch = json.loads(arch_json)
net = OFAMobileNetV3(ks_list=[3, 5, 7], expand_ratio_list=[3, 4, 6], depth_list=[2, 3, 4], width_mult=float(width))
net.load_state_dict({k: v for k, v in tensors.items() if not k.startswith("__")})
net.set_active_subnet(ks=arch["ks"], e=arch["e"], d=arch["d"])
sub = net.get_active_subnet(preserve_weight=True).eval()
bns = [m for m in sub.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
for bn in bns:
    bn.reset_running_stats()
    bn.momentum = None
    bn.train()
with torch.no_grad():
    for i in range(sum(k.startswith("__calib_") for k in tensors)):
        sub(tensors[f"__calib_{i}"].contiguous(memory_format=torch.channels_last))  # as the server feeds them
    sub.eval()
    logits = sub(tensors["__input"])
encoder = MobileNetArchEncoder(image_size_list=list(range(128, 225, 4)), ks_list=[3, 5, 7], expand_list=[3, 4, 6],
                               depth_list=[2, 3, 4])
predictor = AccuracyPredictor(encoder, hidden_size=400, n_layers=3, device="cpu")
predictor.load_state_dict(torch.load(pred_path, map_location="cpu", weights_only=True))
with torch.no_grad():
    acc = predictor.predict_acc([{"ks": arch["ks"], "e": arch["e"], "d": arch["d"], "image_size": arch["r"]}])
with open(out, "w") as f:
    json.dump({"logits": logits.tolist(), "predicted_accuracy": float(acc.reshape(-1)[0])}, f)
