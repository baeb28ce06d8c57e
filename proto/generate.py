"""Regenerate the Python modules of the API from proto/ofa/v1/*.proto into client/v1/.

    python proto/generate.py          # rewrite client/v1/*_pb2*.py(i)
    python proto/generate.py --check  # exit 1 if the committed files are not what protoc makes

The generated modules live in the client package (``ofa_client.v1``) because the
client needs them without torch; the server imports them from there. protoc names
the sibling module ``ofa.v1``; that import is rewritten to a relative one.
"""
from __future__ import annotations

import argparse
import re
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTOS = sorted((ROOT / "proto" / "ofa" / "v1").glob("*.proto"))
DEST = ROOT / "client" / "v1"
VERSION_LINE = re.compile(r"^// API version (\d+\.\d+)\.", re.M)


def package_init() -> str:
    """``v1/__init__.py``: the API version the .proto files state (their line ``// API version M.N.``)."""
    versions = {m.group(1) for p in PROTOS for m in VERSION_LINE.finditer(p.read_text())}
    if len(versions) != 1:
        sys.exit(f"the .proto files must state one API version in a line '// API version M.N.', found {versions}")
    return ('"""Generated gRPC modules of the ofa.v1 API (see proto/generate.py)."""\n\n'
            f'API_VERSION = "{versions.pop()}"  # from the .proto files: the server reports it, the client checks it\n')


def generate() -> dict[str, str]:
    from grpc_tools import protoc

    with tempfile.TemporaryDirectory() as tmp:
        args = ["protoc", f"-I{ROOT / 'proto'}", f"--python_out={tmp}", f"--pyi_out={tmp}",
                f"--grpc_python_out={tmp}"] + [str(p) for p in PROTOS]
        if protoc.main(args) != 0:
            sys.exit("protoc failed")
        out = {}
        for path in sorted((Path(tmp) / "ofa" / "v1").iterdir()):
            text = path.read_text()
            for proto in PROTOS:
                mod = proto.stem + "_pb2"
                text = text.replace(f"from ofa.v1 import {mod}", f"from . import {mod}")
            out[path.name] = text
        out["__init__.py"] = package_init()
        return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--check", action="store_true")
    a = p.parse_args()
    files = generate()
    if a.check:
        stale = [n for n, t in files.items() if not (DEST / n).exists() or (DEST / n).read_text() != t]
        if stale:
            sys.exit(f"client/v1 is out of date ({stale}); run python proto/generate.py")
        print("client/v1 is up to date")
        return
    DEST.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (DEST / name).write_text(text)
        print(f"wrote {DEST / name}")


if __name__ == "__main__":
    main()
