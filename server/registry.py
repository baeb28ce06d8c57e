"""What a server holds: the supernet artifacts, their predictors and the hardware targets.

Targets come from two places: the latency tables shipped in an artifact
(``latency/NAME.json``) and the ones registered through the API, kept as validated
JSON files in a targets folder (``DIR/<space digest[:16]>/NAME.json``). The folder is
re-read when it changes, so replicas that share it answer alike.
"""
from __future__ import annotations

import errno
import itertools
import json
import logging
import os
import stat
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ofa._io import atomic_create_text, atomic_write_text
from ofa.artifact import CALIBRATION, MEASUREMENTS, Artifact, ArtifactError, load_artifact
from ofa.calibrate import served_images
from ofa.export import finetuned_archs
from ofa.jobs.precision import int8_drop
from ofa.predict.latency import TABLE_KEYS, LatencyTableError, validate_table
from ofa.search import Scorer
from ofa.search.load import Measured, load_measured, load_scorer
from ofa.space import Arch, space_digest

from .args import ServeConfig
from .convert import bounded

__all__ = ["KnownTarget", "NotOwner", "Registry", "ServedSupernet", "StorageError", "TargetExists", "TooManyTargets"]

log = logging.getLogger("ofa_server")


class TargetExists(ValueError):
    """A registration that would overwrite a target without ``replace`` (or one shipped in the artifact)."""


@dataclass
class ServedSupernet:
    name: str
    artifact: Artifact
    scorer: Scorer  # the artifact's own targets; a registered one is added by the search worker
    artifact_targets: dict[str, dict[str, Any]]
    digest16: str = field(init=False)
    calibration: Any = field(init=False)  # the images its subnets are calibrated on (decided once)
    fine_tuned: dict[str, Arch] = field(init=False)  # id -> arch of the artifact's fine-tuned subnets
    measured: dict[str, Measured] = field(init=False)  # id -> accuracy measured on these weights
    int8: dict[str, dict[str, Any]] = field(init=False)  # {int8 format: its cost to served subnets} (int8-accuracy)
    known: "OrderedDict[str, Arch]" = field(default_factory=OrderedDict)  # subnet id -> arch
    lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self.digest16 = space_digest(self.artifact.space)[:16]
        self.calibration = served_images(self.artifact)
        self.fine_tuned = finetuned_archs(self.artifact.files)
        self.measured = load_measured(self.artifact.files)
        self.int8 = int8_drop(self.artifact.files)

    def remember(self, arch: Arch, limit: int = 100_000) -> None:
        """Keep ``arch`` by its id (a search returned it), so that its weights can be asked for by id alone."""
        with self.lock:
            self.known[arch.id] = arch
            self.known.move_to_end(arch.id)
            while len(self.known) > limit:
                self.known.popitem(last=False)

    def lookup(self, subnet_id: str) -> Arch | None:
        """The arch of a subnet id this server returned or the artifact holds fine-tuned, or None."""
        with self.lock:
            return self.known.get(subnet_id) or self.fine_tuned.get(subnet_id)


@dataclass(frozen=True)
class KnownTarget:
    """A target a supernet can be searched for, as one scan of the targets folder found it."""

    table: dict[str, Any]
    source: str  # "artifact" | "registered"
    version: int | None = None  # a registered table's version: search workers keep the tables by it

    @property
    def for_workers(self) -> tuple[int, dict[str, Any]] | None:
        """(version, table) of a registered table; None for the artifact's own (the workers load those)."""
        return (self.version, self.table) if self.source == "registered" else None


class NotOwner(Exception):
    """A registered target that another client (another token of ``--token-file``) registered."""


OWNER = "registered_by"  # the key, in a stored table, of the client that registered it


def _check_owner(table: dict[str, Any] | None, client: str, doing: str) -> None:
    """Only the client that registered a table may replace or delete it. A server without tokens knows no
    clients (``client`` is ""), and a table stored without an owner is anyone's."""
    owner = (table or {}).get(OWNER, client)
    if client and owner != client:
        raise NotOwner(f"target {table['target']!r} was registered by client {str(owner)[:80]!r}; only that "
                       f"client's token may {doing} it")


class TooManyTargets(Exception):
    """The supernet has as many registered targets as the server keeps."""


class StorageError(Exception):
    """The targets folder cannot take the table: ``full`` (a retry may work once space is freed) or not writable."""

    def __init__(self, message: str, full: bool) -> None:
        super().__init__(message)
        self.full = full


def read_table_file(path: Path, limit: int) -> Any:
    """A table file of the (untrusted, shared) targets folder: a regular file, not through a symlink, at most
    ``limit`` bytes; opened without blocking, so a FIFO named ``x.json`` cannot hang a thread."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ValueError("not a regular file")
        if st.st_size > limit:
            raise ValueError(f"{st.st_size} bytes, more than the {limit} a table may have")
        with os.fdopen(fd, "rb", closefd=False) as f:
            data = f.read(limit + 1)
    finally:
        os.close(fd)
    if len(data) > limit:
        raise ValueError(f"more than the {limit} bytes a table may have")
    return json.loads(data.decode())


class Registry:
    def __init__(self, artifact_dirs: list[str], targets_dir: str | None = None,
                 names: list[str] | None = None, max_targets: int = ServeConfig.max_targets,
                 table_bytes: int = ServeConfig.max_table_bytes) -> None:
        self.supernets: dict[str, ServedSupernet] = {}
        self.targets_dir = Path(targets_dir) if targets_dir else None
        self.max_targets, self.table_bytes = max_targets, table_bytes
        # Every table kept has a version number of its own (a new one when it changes): search workers keep
        # the tables they were sent by it, so a table crosses to a worker once, not with every search.
        self._versions = itertools.count(1)
        self._memory_tables: dict[tuple[str, str], tuple[dict[str, Any], int]] = {}  # without a targets folder
        # path -> (lstat mtime and size, table or None for a file refused, version): a junk file is not re-read
        # per request; entries of files gone from the folder are dropped at the next scan
        self._disk_cache: dict[Path, tuple[tuple[int, int], dict[str, Any] | None, int]] = {}
        self._lock = threading.Lock()  # the two dicts above; held for a lookup or an update, never across a file
        # one register or delete at a time, from its owner check to its write: a slow fsync (a busy shared
        # disk) holds this, not the lock every search's scan takes
        self._writing = threading.Lock()
        for i, d in enumerate(artifact_dirs):
            name = (names[i] if names and i < len(names) else None) or Path(d).resolve().name
            if name in self.supernets:
                raise ValueError(f"two artifacts are both named {name!r}; give --name for each")
            art = load_artifact(d)
            if art.calibration is None:
                raise ArtifactError(f"{d} has no calibration set ({CALIBRATION}): the server re-calibrates every "
                                    "subnet's BatchNorm on training images before it serves it. Add them with "
                                    f"`ofa import-reference --checkpoint CKPT --out {d} --calib-dir TRAIN_IMAGES` "
                                    "(a folder of a few thousand training images or more)")
            scorer = load_scorer(art.files)  # the files load_artifact verified: not hashed again
            tables = {name: pred.table for name, pred in scorer.latency.items()}
            for name, why in scorer.refused.items():
                log.warning("not serving target %s of %s: %s", name, d, why)
            served = ServedSupernet(name, art, scorer, tables)
            for arch in (art.space.smallest(), art.space.largest()):
                served.remember(arch)
            if art.files.has(MEASUREMENTS):
                for item in art.files.read_json(MEASUREMENTS)["subnets"].values():
                    served.remember(Arch.from_dict(item["arch"]))
            self.supernets[name] = served
            log.info("serving %s from %s (digest %s, %d targets, accuracy predictor: %s)", name, d,
                     art.digest[:12], len(tables), "yes" if scorer.accuracy is not None else "no")

    # ---- targets -----------------------------------------------------------------
    def _folder(self, sn: ServedSupernet) -> Path | None:
        return self.targets_dir / sn.digest16 if self.targets_dir else None

    def registered_tables(self, sn: ServedSupernet) -> dict[str, dict[str, Any]]:
        """Registered tables for this supernet's space, re-read from disk when a file changed."""
        return {name: table for name, (table, _) in self._registered(sn).items()}

    def _registered(self, sn: ServedSupernet) -> dict[str, tuple[dict[str, Any], int]]:
        """name -> (table, version) of the registered targets."""
        folder = self._folder(sn)
        if folder is None:
            with self._lock:
                return {t: entry for (d, t), entry in self._memory_tables.items() if d == sn.digest16}
        out = {}
        try:
            files = sorted(folder.glob("*.json"))[: 4 * self.max_targets]  # a flooded folder: a bounded scan
        except OSError:
            return out
        for path in files:
            try:
                st = path.lstat()
            except OSError:
                continue
            # a replace by rename is a new inode, and changes ctime: a same-size table replaced within one
            # timestamp tick (coarse on older kernels) is read again, not served stale
            key = (st.st_ino, st.st_mtime_ns, st.st_ctime_ns, st.st_size)
            with self._lock:
                cached = self._disk_cache.get(path)
            if cached is None or cached[0] != key:
                table = None
                try:
                    if not stat.S_ISREG(st.st_mode):
                        raise ValueError("not a regular file (symlinks, FIFOs and devices are not read)")
                    table = validate_table(read_table_file(path, self.table_bytes), sn.artifact.space)
                except (OSError, ValueError, RecursionError) as e:
                    log.warning("ignoring target file %s: %s", path, bounded(str(e)))
                cached = (key, table, next(self._versions))
                with self._lock:
                    self._disk_cache[path] = cached
            if cached[1] is not None:
                out[cached[1]["target"]] = (cached[1], cached[2])
        listed = set(files)
        with self._lock:  # files removed (here or by another replica) are forgotten
            for path in [q for q in self._disk_cache if q.parent == folder and q not in listed]:
                del self._disk_cache[path]
        return out

    def targets(self, sn: ServedSupernet) -> dict[str, KnownTarget]:
        """Every target of a supernet, the registered ones from one scan of its targets folder (a request
        reads them once and passes them on)."""
        out = {name: KnownTarget(t, "registered", v) for name, (t, v) in self._registered(sn).items()}
        out.update({name: KnownTarget(t, "artifact") for name, t in sn.artifact_targets.items()})
        return out

    def known_targets(self, sn: ServedSupernet) -> list[str]:
        """The names of every target of a supernet, sorted."""
        return sorted(self.targets(sn))

    def scanned_files(self) -> dict[Path, bool]:
        """The files of the targets folders as the last scans found them: path -> whether it held a valid table
        (a refused file is not read again until it changes)."""
        with self._lock:
            return {path: table is not None for path, (_, table, _) in self._disk_cache.items()}

    def register(self, sn: ServedSupernet, table_json: str, replace: bool, client: str = "") -> dict[str, Any]:
        """Validate a table against the supernet's space and keep it, owned by ``client``; returns the table.
        Replacing a target needs the client that registered it."""
        try:
            table = json.loads(table_json)
        except ValueError as e:
            raise LatencyTableError(f"table_json is not valid JSON: {e}") from None
        except RecursionError:
            raise LatencyTableError("table_json nests too deeply to be a latency table") from None
        table = validate_table(table, sn.artifact.space)
        table = {k: table[k] for k in TABLE_KEYS if k in table}  # what a client adds beyond the format is not kept
        if client:
            table[OWNER] = client
        text = json.dumps(table, sort_keys=True)
        if len(text.encode()) > self.table_bytes:
            raise LatencyTableError(f"the table takes {len(text.encode())} bytes as stored; at most "
                                    f"{self.table_bytes} are kept")
        name = table["target"]
        if name in sn.artifact_targets:
            raise TargetExists(f"target {name!r} ships with the supernet and cannot be replaced; "
                               f"register the table under another target name")
        folder = self._folder(sn)
        taken = TargetExists(f"target {name!r} is already registered; set replace to overwrite it")
        registered = self.registered_tables(sn)
        if name not in registered and len(registered) >= self.max_targets:
            raise TooManyTargets(f"supernet {sn.name!r} has {len(registered)} registered targets, the most this "
                                 f"server keeps (--max-targets); replace one (replace=true) or remove one")
        with self._writing:
            if replace:
                _check_owner(self._stored(sn, name), client, "replace")
            if folder is None:
                with self._lock:
                    if (sn.digest16, name) in self._memory_tables and not replace:
                        raise taken
                    self._memory_tables[(sn.digest16, name)] = (table, next(self._versions))
            else:
                try:  # without replace, creating the file is the check: replicas may share the folder
                    folder.mkdir(parents=True, exist_ok=True)
                    (atomic_write_text if replace else atomic_create_text)(folder / f"{name}.json", text)
                except FileExistsError:
                    raise taken from None
                except OSError as e:
                    full = e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
                    raise StorageError(f"the targets folder cannot take the table: {e.strerror} "
                                       f"({'full' if full else 'not writable'}); nothing was stored", full) from None
        log.info("registered target %s for %s%s", name, sn.name, f" in {folder}" if folder else " (in memory)")
        return table


    def _stored(self, sn: ServedSupernet, name: str) -> dict[str, Any] | None:
        """The table registered as ``name`` as it is now (read from its file, not a scan), or None; under
        ``self._writing``, just before it is replaced or removed."""
        folder = self._folder(sn)
        if folder is None:
            with self._lock:
                entry = self._memory_tables.get((sn.digest16, name))
            return None if entry is None else entry[0]
        try:
            table = read_table_file(folder / f"{name}.json", self.table_bytes)
        except (OSError, ValueError, RecursionError):
            return None
        return table if isinstance(table, dict) and table.get("target") == name else None

    def delete(self, sn: ServedSupernet, name: str, client: str = "") -> None:
        """Remove a registered target (``client`` must be the one that registered it); KeyError when there is
        none of that name."""
        if name in sn.artifact_targets:
            raise TargetExists(f"target {name!r} ships with the supernet and cannot be removed")
        folder = self._folder(sn)
        with self._writing:
            _check_owner(self._stored(sn, name), client, "delete")
            if folder is None:
                with self._lock:
                    if self._memory_tables.pop((sn.digest16, name), None) is None:
                        raise KeyError(name)
            else:
                path = folder / f"{name}.json"
                try:
                    path.unlink()
                except FileNotFoundError:
                    raise KeyError(name) from None
                except OSError as e:
                    raise StorageError(f"the targets folder cannot remove the table: {e.strerror}", False) from None
                with self._lock:
                    self._disk_cache.pop(path, None)
        log.info("removed target %s of %s", name, sn.name)
