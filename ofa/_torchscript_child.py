"""Run as a script by :func:`ofa.export.export_torchscript`, in a fresh interpreter: script one subnet.

stdin: the subnet file's metadata (one JSON line), then its safetensors bytes; stdout: the
TorchScript archive. argv[1]: the folder that holds this ``ofa`` package (and nothing else is
put on the path).
"""
import io
import json
import sys

sys.path.insert(0, sys.argv[1])

import torch  # noqa: E402
from safetensors.torch import load  # noqa: E402

from ofa.space import Arch, SearchSpace  # noqa: E402
from ofa.subnet import load_subnet  # noqa: E402

meta = sys.stdin.buffer.readline().decode()
m = json.loads(meta)
net = load_subnet(SearchSpace.from_dict(m["space"]), Arch.from_dict(m["arch"]), load(sys.stdin.buffer.read())).eval()
buf = io.BytesIO()
torch.jit.save(torch.jit.script(net), buf, _extra_files={"ofa.json": meta.strip()})
sys.stdout.buffer.write(buf.getvalue())
