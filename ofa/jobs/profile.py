"""``ofa profile``: a latency table of this machine for a space, or a table's references re-timed now; the
table checked and written to a file and/or into an artifact. The timing and the fit are
:mod:`ofa.predict.profile`'s; this is the run around them (which space, which table, where it goes)."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Callable

from ..artifact import add_file, latency_file, open_artifact
from ..predict.latency import validate_table
from ..predict.profile import profile_space, recalibrate
from ..predict.timing import Timing, Timings
from ..space import Arch, SearchSpace, get_space, space_digest, space_names

__all__ = ["KIT_FORMAT", "KIT_MANIFEST", "KIT_VERSION", "profile_target", "read_space_file", "recalibrate_table",
           "space_to_profile", "table_to_recalibrate", "write_kit", "write_table"]


def read_space_file(path: str | Path) -> SearchSpace:
    """The search space defined in the JSON file ``path`` (``SearchSpace.to_json``)."""
    try:
        return SearchSpace.from_dict(json.loads(Path(path).read_text()))
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"space_file {path} is not a search-space definition: {e}") from None


def space_to_profile(artifact: str | None, space: str | None, space_file: str | None) -> SearchSpace:
    """The space a profile times: a space file's, else an artifact's, else a registered space."""
    if space_file:
        return read_space_file(space_file)
    if artifact:
        return open_artifact(artifact).space()
    return get_space(space)


def write_table(space: SearchSpace, table: dict[str, Any], out: str | None, artifact: str | None) -> list[Path]:
    """``table`` checked against ``space`` and written to ``out`` and/or into ``artifact``; the paths written."""
    text = json.dumps(validate_table(table, space), indent=1, sort_keys=True)
    written = []
    if out:
        Path(out).write_text(text)
        written.append(Path(out))
    if artifact:
        written.append(add_file(Path(artifact), latency_file(table["target"]), text))
    return written


def profile_target(space: SearchSpace, target: str, timing: Timing, subnets: int, held_out: float,
                   references: int, seed: int, progress: bool, out: str | None,
                   artifact: str | None) -> tuple[dict[str, Any], list[Path]]:
    """Profile ``space`` on this machine as ``target`` and write the table; the table and the paths written."""
    table = profile_space(space, target, timing, subnets=subnets, held_out=held_out, references=references,
                          seed=seed, progress=progress)
    return table, write_table(space, table, out, artifact)


def table_to_recalibrate(table_file: str | None, artifact: str | None, target: str | None,
                         space_file: str | None) -> tuple[SearchSpace, dict[str, Any]]:
    """The space and the table a re-timing reads: a table file (its space registered here, or a space file's),
    or an artifact's table of ``target``."""
    if table_file:
        table = json.loads(Path(table_file).read_text())
        if space_file:
            return read_space_file(space_file), table
        name = table.get("space", {}).get("name")
        if name not in space_names():
            raise ValueError(f"space_file is needed: the table's space {name!r} is not registered here")
        return get_space(name), table
    files = open_artifact(artifact)
    if not files.has(latency_file(target)):
        raise ValueError(f"target {target!r} has no latency table in {artifact}; profile it first")
    space = read_space_file(space_file) if space_file else files.space()
    return space, files.read_json(latency_file(target))


def recalibrate_table(space: SearchSpace, table: dict[str, Any], progress: bool, accept_noisy: bool,
                      out: str | None, artifact: str | None) -> tuple[dict[str, Any], Timings, list[Path]]:
    """Re-time ``table``'s references now, store the device's speed in it and write it (where given)."""
    table, timings = recalibrate(space, validate_table(table, space), progress=progress, accept_noisy=accept_noisy)
    written = write_table(space, table, out, artifact) if out or artifact else []
    return table, timings, written


# ---- the profiling kit: what a device times, for ``ofa-client profile`` (no torch there) ----------------
KIT_FORMAT, KIT_VERSION = "ofa-profile-kit", 1
KIT_MANIFEST = "kit.json"


def _recipe(space: SearchSpace, arch: Arch, fixed: dict, slots: dict) -> dict[str, Any]:
    """How a subnet's model features are made from the entries' times (see LatencyPredictor.features): the
    fixed parts' keys, each stage's block keys, the number of blocks and the resolution."""
    r = arch.resolution
    stages: list[list[str]] = [[] for _ in range(space.num_stages)]
    for slot, k, e in space.active_slots(arch):
        stages[slot.stage].append(slots[(r, slot.index, space.kernel_choices.index(k), space.expand_choices.index(e))])
    return {"fixed": list(fixed[r]), "stages": stages, "blocks": sum(map(len, stages)), "resolution": r}


def write_kit(space: SearchSpace, folder: str | Path, subnets: int = 80, held_out: float = 0.25,
              references: int = 10, seed: int = 0, progress: bool = True, precision: str = "fp32",
              runtime: str = "onnxruntime", stop: Callable[[], bool] | None = None) -> dict[str, Any]:
    """Write into ``folder`` what a device times to become a target: every distinct block of ``space``, its
    reference subnets and ``subnets`` random ones as ONNX files (as ``ofa profile`` exports them: opset
    :data:`ofa.export.ONNX_OPSET`, static shapes, batch 1; ``precision`` int8: quantized as ``runtime``'s served
    int8 file is), and ``kit.json``: the space, each file's sha256, input shape and role, each subnet's feature
    recipe, the served format it stands for and the runtimes that run it, and the table format it makes.
    Returns the manifest. ``stop()`` turning true kills the export workers (an
    :class:`ofa_client.timing.TimingError`)."""
    from ..export import ONNX_OPSET, run_format, writable
    from ..predict.latency import TABLE_FORMAT, TABLE_VERSION, block_plan, iter_plan
    from ..predict.profile import check_profile, e2e_archs, held_out_mask, reference_archs
    from ..predict.timing import ONNX_BACKENDS, Part, _worker_items, subnet_part

    check_profile(subnets, held_out, references)
    folder = Path(folder).resolve()
    (folder / "nets").mkdir(parents=True, exist_ok=True)
    plan = list(iter_plan(space, seed))
    refs = reference_archs(space, references, seed)
    e2e = e2e_archs(space, refs, subnets, seed)
    parts = [Part(e.kind, e.in_shape, block=e.block) for e in plan] + [subnet_part(space, a) for a in e2e]
    if runtime not in ONNX_BACKENDS:
        raise ValueError(f"a kit is timed by an ONNX runtime: runtime must be one of {list(ONNX_BACKENDS)}, "
                         f"got {runtime!r}")
    fmt = writable(run_format(runtime, precision))  # the runtime itself need not be installed: nothing runs here
    items = _worker_items(space, parts, Timing(backend=runtime, seed=seed, precision=precision), folder / "nets",
                          progress, in_process=0, stop=stop)  # in workers: a server builds its kits in a thread
    files = [{"file": str(Path(i["file"]).relative_to(folder)), "shape": i["shape"][1:],
              "sha256": hashlib.sha256(Path(i["file"]).read_bytes()).hexdigest()} for i in items]
    _, fixed, slots = block_plan(space)
    held = held_out_mask(len(e2e), len(refs), held_out, seed)
    roles = ["reference"] * len(refs) + ["held_out" if h else "fit" for h in held[len(refs):]]
    manifest = {"format": KIT_FORMAT, "version": KIT_VERSION, "space": space.to_dict(),
                "space_digest": space_digest(space), "opset": ONNX_OPSET, "seed": seed, "batch": 1,
                "precision": precision, "weights_format": fmt.name, "runtimes": list(fmt.runtimes),
                "table": {"format": TABLE_FORMAT, "version": TABLE_VERSION},
                "entries": [{"key": e.key, **f} for e, f in zip(plan, files)],
                "subnets": [{"arch": a.to_dict(), "role": role, "features": _recipe(space, a, fixed, slots), **f}
                            for a, role, f in zip(e2e, roles, files[len(plan):])]}
    (folder / KIT_MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True))
    return manifest
