"""Baselines for reports: torchvision's ``mobilenet_v3_small`` trained from scratch on an artifact's data.

Each is trained with the recipe of :mod:`ofa.scratch` for the given epochs and cached in
``OUT/baselines`` by (artifact digest, width, epochs, resolution), so a rerun reuses it.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

__all__ = ["Baseline", "train_baselines"]


@dataclass
class Baseline:
    """One trained baseline: its network apart from ``row``, the figures a report shows."""

    module: Any  # torch.nn.Module
    row: dict[str, Any] = field(default_factory=dict)


def _train_set(art, data_dir: str | None):
    from ..data import load_dataset, split_validation

    training = art.manifest["training"]
    full, _ = load_dataset(training["dataset"], data_dir or training.get("data_dir") or None, True,
                           training.get("image_size", 224))
    return split_validation(full, training["val_size"], training["seed"])[0]


def train_baselines(art, widths: Sequence[float], epochs: float, out: Path, data_dir: str | None,
                    progress: bool, log: Callable[[str], None]) -> list[Baseline]:
    """mobilenet_v3_small × width for each of ``widths``, trained from scratch or reused from ``out/baselines``."""
    from safetensors.torch import load_file, save_file

    from .._torch import seeded
    from ..subnet import mobilenet_v3_small_baseline
    from .scratch import train_from_scratch

    training = art.manifest["training"]
    resolution = max(art.space.resolutions)
    folder = out / "baselines"
    folder.mkdir(parents=True, exist_ok=True)
    train_set, done = None, []
    for w in widths:
        name = f"mobilenet_v3_small x{w:g}"
        recipe = {"artifact": art.digest, "width_mult": w, "epochs": epochs, "resolution": resolution}
        weights, info_path = folder / f"mbv3-small-x{w:g}.safetensors", folder / f"mbv3-small-x{w:g}.json"
        net = mobilenet_v3_small_baseline(w, art.data.channels, art.data.num_classes)
        if info_path.exists() and weights.exists() and json.loads(info_path.read_text()).get("recipe") == recipe:
            net.load_state_dict(load_file(str(weights)))
            stats = json.loads(info_path.read_text())["training"]
            log(f"  {name}: reusing the one trained before ({weights})")
        else:
            train_set = train_set if train_set is not None else _train_set(art, data_dir)
            with seeded(training["seed"]):  # the run's seed, and the caller's generator left as it was
                net, stats = train_from_scratch(net, resolution, train_set, art.data, training, epochs,
                                                training["seed"], progress, desc=f"{name} from scratch")
            save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(weights))
            info_path.write_text(json.dumps({"recipe": recipe, "training": stats}, indent=1))
            log(f"  {name}: trained {stats['steps']} steps in {stats['seconds']:.0f} s ({stats['img_per_s']:.0f} img/s)")
        done.append(Baseline(net.eval(), {"name": name, "width_mult": w, "resolution": resolution,
                                          "in_channels": art.data.channels,
                                          "params": sum(p.numel() for p in net.parameters()),
                                          "size_bytes": weights.stat().st_size, "training": stats}))
    return done
