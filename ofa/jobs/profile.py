"""``ofa profile``: a latency table of this machine for a space, or a table's references re-timed now; the
table checked and written to a file and/or into an artifact. The timing and the fit are
:mod:`ofa.predict.profile`'s; this is the run around them (which space, which table, where it goes)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..artifact import add_file, latency_file, open_artifact
from ..predict.latency import validate_table
from ..predict.profile import profile_space, recalibrate
from ..predict.timing import Timing, Timings
from ..space import SearchSpace, get_space, space_names

__all__ = ["profile_target", "read_space_file", "recalibrate_table", "space_to_profile", "table_to_recalibrate",
           "write_table"]


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
