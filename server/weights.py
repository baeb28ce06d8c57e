"""Ready-to-run weights of one subnet: extract, BN re-calibration, serialisation, and a byte-bounded cache.

Every format is a pure function of (artifact, arch, format): the calibration images are
the artifact's, in their stored order, and each writer is deterministic (checked by
the tests), so the same request gives byte-identical bytes in any process.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch

import ofa
from ofa.artifact import Artifact
from ofa.calibrate import calibrate_bn
from ofa.space import Arch
from ofa.subnet import export_onnx
from ofa.supernet import extract

__all__ = ["FORMATS", "Payload", "WeightsCache", "build_payload", "DEFAULT_CALIBRATION_IMAGES"]

FORMATS = ("safetensors", "onnx", "torchscript")
# BN statistics from this many of the artifact's calibration images (all it stores, up to 2000).
DEFAULT_CALIBRATION_IMAGES = 2000


@dataclass(frozen=True)
class Payload:
    data: bytes
    sha256: str
    calibration_images: int


def _metadata(art: Artifact, arch: Arch, n_calib: int) -> str:
    meta = {"format": "ofa-subnet", "version": 1, "arch": arch.to_dict(), "id": arch.id,
            "space": art.space.to_dict(), "data": art.data.to_dict(), "supernet_digest": art.digest,
            "calibration_images": n_calib}
    return json.dumps(meta, sort_keys=True, separators=(",", ":"))


def calibrated_subnet(art: Artifact, arch: Arch, calibration_images: int = DEFAULT_CALIBRATION_IMAGES,
                      should_stop=None) -> tuple[torch.nn.Module, int]:
    images = art.calibration[:calibration_images]
    sub = extract(art.supernet, arch)
    calibrate_bn(sub, images, art.data, arch.resolution, should_stop=should_stop)
    return sub.eval(), len(images)


SCRIPT_TIMEOUT_S = 300.0  # a TorchScript export still running after this is killed; the call may retry

_SCRIPT_CHILD = """
import io, json, sys
sys.path.insert(0, sys.argv[1])  # the folder holding this server's ofa package, and nothing else
import torch
from safetensors.torch import load
from ofa.space import Arch, SearchSpace
from ofa.subnet import load_subnet
meta = sys.stdin.buffer.readline().decode()
m = json.loads(meta)
net = load_subnet(SearchSpace.from_dict(m["space"]), Arch.from_dict(m["arch"]), load(sys.stdin.buffer.read())).eval()
buf = io.BytesIO()
torch.jit.save(torch.jit.script(net), buf, _extra_files={"ofa.json": meta.strip()})
sys.stdout.buffer.write(buf.getvalue())
"""


def _script_in_fresh_process(sub: torch.nn.Module, art: Artifact, arch: Arch, n_calib: int) -> bytes:
    """TorchScript bytes made in a new interpreter.

    The scripted code names specialised module classes with a per-process counter
    (``___torch_mangle_N``), so the same subnet scripted after others gives other
    bytes; a fresh process makes the bytes a function of the subnet alone.
    """
    import subprocess
    import sys

    from safetensors.torch import save

    state = save({k: v.detach().contiguous() for k, v in sub.state_dict().items()})
    # A clean environment (the scripted code lists module constants in set order, which follows string
    # hashing: a fixed seed), no user site-packages (-s) and not the working directory on the path (-P):
    # a torch.py or ofa.py where the server was started is never imported.
    env = {"PYTHONHASHSEED": "0", "PATH": os.environ.get("PATH", "/usr/bin:/bin"), "OMP_NUM_THREADS": "1"}
    root = str(Path(ofa.__file__).resolve().parent.parent)
    try:
        proc = subprocess.run([sys.executable, "-s", "-P", "-c", _SCRIPT_CHILD, root],
                              input=_metadata(art, arch, n_calib).encode() + b"\n" + state, capture_output=True,
                              check=False, env=env, cwd="/", timeout=SCRIPT_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise TimeoutError(f"the TorchScript export took longer than {SCRIPT_TIMEOUT_S:g} s and was stopped; "
                           f"retry") from None
    if proc.returncode != 0:
        raise RuntimeError(f"TorchScript export failed: {proc.stderr.decode()[-2000:]}")
    return _fixed_serialization_id(proc.stdout)


def _fixed_serialization_id(data: bytes) -> bytes:
    """Replace the random ``.data/serialization_id`` record of a torch zip by digits of its content's sha256.

    The record is stored uncompressed; its bytes and the CRC-32 in the local and central
    headers are rewritten in place, so every offset stays valid.
    """
    import struct
    import zipfile
    import zlib

    zf = zipfile.ZipFile(io.BytesIO(data))
    info = next((i for i in zf.infolist() if i.filename.endswith(".data/serialization_id")), None)
    if info is None:
        return data
    if info.compress_type != zipfile.ZIP_STORED:
        raise RuntimeError("unexpected compressed serialization_id record")
    buf = bytearray(data)
    name_len, extra_len = struct.unpack_from("<HH", buf, info.header_offset + 26)
    start = info.header_offset + 30 + name_len + extra_len
    size = info.file_size
    rest = hashlib.sha256(bytes(buf[:start]) + bytes(buf[start + size:])).hexdigest()
    new = str(int(rest, 16)).zfill(size)[-size:].encode()
    buf[start : start + size] = new
    crc = zlib.crc32(new)
    struct.pack_into("<I", buf, info.header_offset + 14, crc)
    pos, name = zf.start_dir, info.filename.encode()
    while buf[pos : pos + 4] == b"PK\x01\x02":
        n, m, k = struct.unpack_from("<HHH", buf, pos + 28)
        if bytes(buf[pos + 46 : pos + 46 + n]) == name:
            struct.pack_into("<I", buf, pos + 16, crc)
            break
        pos += 46 + n + m + k
    return bytes(buf)


def build_payload(art: Artifact, arch: Arch, fmt: str,
                  calibration_images: int = DEFAULT_CALIBRATION_IMAGES, should_stop=None) -> Payload:
    """The bytes of ``arch`` in ``fmt`` (one of :data:`FORMATS`); ``should_stop`` can end the BN
    re-calibration between batches (:class:`ofa.calibrate.CalibrationCancelled`)."""
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")
    with torch.inference_mode(False), torch.no_grad():
        sub, n = calibrated_subnet(art, arch, calibration_images, should_stop)
        if fmt == "safetensors":
            from safetensors.torch import save

            tensors = {k: v.detach().contiguous() for k, v in sub.state_dict().items()}
            data = save(tensors, metadata={"ofa": _metadata(art, arch, n)})
        elif fmt == "torchscript":
            data = _script_in_fresh_process(sub, art, arch, n)
        else:
            data = export_onnx(sub, torch.zeros(1, art.space.in_channels, arch.resolution, arch.resolution))
    return Payload(data, hashlib.sha256(data).hexdigest(), n)


class WeightsCache:
    """Built payloads keyed by (artifact digest, arch id, format), least recently used out, bounded in bytes.

    Concurrent requests for the same key build it once; the others wait for it. Payloads of archs
    no search has returned ("strangers": any valid arch may be asked for) share at most
    ``1/STRANGER_SHARE`` of the bytes and evict each other (searched ones only for that share),
    so a client asking for many arbitrary archs cannot push out the subnets that searches serve.
    """

    STRANGER_SHARE = 8

    def __init__(self, max_bytes: int = 512 << 20) -> None:
        self.max_bytes = max_bytes
        self._items: "OrderedDict[tuple[str, str, str], Payload]" = OrderedDict()
        self._strangers: "OrderedDict[tuple[str, str, str], None]" = OrderedDict()
        self._bytes = self._stranger_bytes = 0
        self._lock = threading.Lock()
        self._building: dict[tuple[str, str, str], threading.Lock] = {}
        self.hits = self.misses = 0

    def get(self, key: tuple[str, str, str], searched: bool = True) -> Payload | None:
        with self._lock:
            item = self._items.get(key)
            if item is not None:
                self._items.move_to_end(key)
                self.hits += 1
                if key in self._strangers:
                    if searched:  # a search has returned it since
                        del self._strangers[key]
                        self._stranger_bytes -= len(item.data)
                    else:
                        self._strangers.move_to_end(key)
            return item

    def _drop(self, key) -> None:
        old = self._items.pop(key)
        self._bytes -= len(old.data)
        if self._strangers.pop(key, False) is None:
            self._stranger_bytes -= len(old.data)

    def _store(self, key, item: Payload, searched: bool) -> None:
        size = len(item.data)
        if size > (self.max_bytes if searched else self.max_bytes // self.STRANGER_SHARE):
            return
        self._items[key] = item
        self._bytes += size
        if not searched:
            self._strangers[key] = None
            self._stranger_bytes += size
            while self._stranger_bytes > self.max_bytes // self.STRANGER_SHARE:
                self._drop(next(iter(self._strangers)))
        while self._bytes > self.max_bytes:
            self._drop(next(iter(self._items)))

    def get_or_build(self, key: tuple[str, str, str], build, searched: bool = True) -> Payload:
        item = self.get(key, searched)
        if item is not None:
            return item
        with self._lock:
            lock = self._building.setdefault(key, threading.Lock())
        with lock:
            item = self.get(key, searched)
            if item is not None:
                return item
            try:
                item = build()
            except BaseException:  # failed or cancelled: the next request builds anew
                with self._lock:
                    self._building.pop(key, None)
                raise
            with self._lock:  # stored and unlocked at once, so no request in between builds it again
                self.misses += 1
                self._building.pop(key, None)
                self._store(key, item, searched)
            return item

    @property
    def bytes(self) -> int:
        return self._bytes

    # ---- read-only views (for health pages and tests) ----
    @property
    def building_count(self) -> int:
        """Payloads being built now."""
        with self._lock:
            return len(self._building)

    @property
    def stranger_bytes(self) -> int:
        """Bytes held by payloads of archs no search has returned."""
        return self._stranger_bytes

    def keys(self) -> list[tuple[str, str, str]]:
        """The keys of the payloads held, least recently used first."""
        with self._lock:
            return list(self._items)
