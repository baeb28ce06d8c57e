"""Measurements of the reference package, run in a process of its own.

The reference's import name ``ofa`` clashes with ours, so the benchmarks start this
file with the reference folder first on ``sys.path`` and read one JSON line back.
Usage: python _reference_worker.py REF_DIR TASK ARGS_JSON
"""
import json
import sys
import time

ref_dir, task, args = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
sys.path.insert(0, ref_dir)

import ofa  # noqa: E402
import torch  # noqa: E402

if not ofa.__file__.startswith(ref_dir):
    sys.exit(f"expected the reference ofa from {ref_dir}, imported {ofa.__file__}")
from ofa.imagenet_classification.elastic_nn.networks import OFAMobileNetV3  # noqa: E402

torch.set_num_threads(args.get("threads", 2))
torch.manual_seed(0)
net = OFAMobileNetV3(ks_list=[3, 5, 7], expand_ratio_list=[3, 4, 6], depth_list=[2, 3, 4])


def train_step() -> dict:
    """Forward+backward+SGD with a new arch each step, batch at one resolution."""
    channels_last = args.get("channels_last", False)
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    batch, r = args["batch"], args["resolution"]
    x = torch.randn(batch, 3, r, r)
    if channels_last:
        net.to(memory_format=torch.channels_last)
        x = x.to(memory_format=torch.channels_last)
    y = torch.randint(0, 1000, (batch,))
    net.train()
    times = []
    for cfg in args["archs"]:
        net.set_active_subnet(ks=cfg["ks"], e=cfg["e"], d=cfg["d"])
        t = time.perf_counter()
        loss = torch.nn.functional.cross_entropy(net(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t)
    return {"times": times}


def extract() -> dict:
    """get_active_subnet(preserve_weight=True) for each arch."""
    times = []
    for cfg in args["archs"]:
        t = time.perf_counter()
        net.set_active_subnet(ks=cfg["ks"], e=cfg["e"], d=cfg["d"])
        net.get_active_subnet(preserve_weight=True)
        times.append(time.perf_counter() - t)
    return {"times": times}


def search() -> dict:
    """EvolutionFinder with a 3x400 MLP accuracy predictor (weights from a file) and a MACs bound."""
    import random

    import numpy as np
    from safetensors.torch import load_file
    from ofa.nas.accuracy_predictor import AccuracyPredictor, MobileNetArchEncoder
    from ofa.nas.efficiency_predictor import Mbv3FLOPsModel
    from ofa.nas.search_algorithm import EvolutionFinder

    encoder = MobileNetArchEncoder(image_size_list=args["resolutions"], ks_list=[3, 5, 7],
                                   expand_list=[3, 4, 6], depth_list=[2, 3, 4])
    predictor = AccuracyPredictor(encoder, hidden_size=400, n_layers=3, device="cpu")
    predictor.load_state_dict(load_file(args["weights"]))
    efficiency = Mbv3FLOPsModel(net)
    finder = EvolutionFinder(efficiency, predictor, population_size=args["population"],
                             max_time_budget=args["generations"])
    with torch.no_grad():
        check = [{k: list(v) if isinstance(v, list) else v for k, v in a.items()} for a in args["check_archs"]]
        check_acc = predictor.predict_acc(check).tolist()
        check_macs = [efficiency.get_efficiency(a) for a in check]
        if args.get("warmup"):  # as ours gets: a short search first, untimed
            short = EvolutionFinder(efficiency, predictor, population_size=args["population"], max_time_budget=5)
            short.run_evolution_search(args["constraint_mflops"], verbose=False)
        runs = []
        for seed in args["seeds"]:
            random.seed(seed)
            np.random.seed(seed)
            torch.manual_seed(seed)
            t = time.perf_counter()
            _, best = finder.run_evolution_search(args["constraint_mflops"], verbose=False)
            runs.append({"seed": seed, "seconds": time.perf_counter() - t, "accuracy": best[0],
                         "arch": best[1], "mflops": best[2]})
    return {"runs": runs, "check_accuracy": check_acc, "check_mflops": check_macs}


def random_checkpoint() -> dict:
    """The .pth files a user of the reference holds, with random weights (the pretrained ones cannot be
    downloaded here): an OFAMobileNetV3 of ``width`` and an AccuracyPredictor (3x400, 25 resolutions)."""
    from ofa.nas.accuracy_predictor import AccuracyPredictor, MobileNetArchEncoder

    model = OFAMobileNetV3(ks_list=[3, 5, 7], expand_ratio_list=[3, 4, 6], depth_list=[2, 3, 4],
                           width_mult=args["width"])
    torch.save({"state_dict": model.state_dict()}, args["checkpoint"])
    encoder = MobileNetArchEncoder(image_size_list=list(range(128, 225, 4)), ks_list=[3, 5, 7],
                                   expand_list=[3, 4, 6], depth_list=[2, 3, 4])
    predictor = AccuracyPredictor(encoder, hidden_size=400, n_layers=3, device="cpu")
    with torch.no_grad():
        predictor.base_acc.fill_(0.78)
    torch.save(predictor.state_dict(), args["predictor"])
    return {"tensors": len(model.state_dict())}


print(json.dumps({"train_step": train_step, "extract": extract, "search": search,
                  "random_checkpoint": random_checkpoint}[task]()))
