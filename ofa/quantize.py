"""The int8 quantizers of served formats (:data:`ofa.export.FORMATS`): onnxruntime's static quantizer and NNCF.

Each takes ONNX bytes and calibration batches (the model's one input) and gives the same bytes for the same
inputs in any process. Both change process-wide state while they run (the warnings filters; a filter on the root
logger; NNCF's progress bars go to ``sys.stdout``, kept out of the caller's output by a redirect), so one lock runs them
one at a time: a server quantizing two files at once cannot leave ``sys.stdout`` pointing at a discarded
buffer. Another thread's prints during NNCF's calibration are lost; the server prints nothing then.

NNCF's usage telemetry is turned off (:func:`quantize_nncf`): it posted each call to Google Analytics from a
process it forked for the purpose, unasked, ~3 s of a quantizing process's time here, and forking a gRPC server's
process is unsafe besides.
"""
from __future__ import annotations

import contextlib
import io
import logging
import os
import threading
import warnings
from pathlib import Path
from typing import Iterable

import numpy as np

__all__ = ["quantize_nncf", "quantize_onnx"]

_ONE_AT_A_TIME = threading.Lock()


class _NoPreprocessingAdvice(logging.Filter):
    """Drops onnxruntime's advice to pre-process a model before quantizing it, twice a file on the root logger:
    the served int8 file is quantized as it is, on purpose (the same bytes in any process)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "pre-processing before quantization" not in str(record.msg)  # not getMessage(): it may raise


def quantize_onnx(data: bytes, batches: Iterable[np.ndarray]) -> bytes:
    """ONNX bytes quantized to int8 by onnxruntime's static quantizer, calibrated on ``batches`` (the model's
    one input): QDQ format, weights per channel (signed), activations unsigned, min-max ranges. The same
    bytes and batches give the same bytes in any process."""
    import tempfile

    import onnx
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    name = onnx.load_model_from_string(data).graph.input[0].name

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter(batches)

        def get_next(self) -> dict[str, np.ndarray] | None:
            batch = next(self.batches, None)
            return None if batch is None else {name: np.ascontiguousarray(batch, dtype=np.float32)}

    with tempfile.TemporaryDirectory(prefix="ofa-int8-") as tmp, _ONE_AT_A_TIME:
        src, out = Path(tmp) / "fp32.onnx", Path(tmp) / "int8.onnx"
        src.write_bytes(data)
        advice, root = _NoPreprocessingAdvice(), logging.getLogger()
        root.addFilter(advice)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                quantize_static(str(src), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                                activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
        finally:
            root.removeFilter(advice)
        return out.read_bytes()


def quantize_nncf(data: bytes, batches: Iterable[np.ndarray]) -> bytes:
    """ONNX bytes quantized to int8 by NNCF (OpenVINO's quantizer, its ONNX backend), calibrated on ``batches``:
    NNCF's defaults for a CPU target (performance preset: symmetric ranges, weights per channel; fast bias
    correction), written as QDQ ONNX that OpenVINO compiles to int8. NNCF reads whether to send telemetry from
    its environment when first imported: ``NNCF_CI`` set, it sends none (where the caller has set it, as it is)."""
    os.environ.setdefault("NNCF_CI", "1")
    import nncf
    import onnx

    model = onnx.load_model_from_string(data)
    name, feeds = model.graph.input[0].name, [np.ascontiguousarray(b, dtype=np.float32) for b in batches]
    with _ONE_AT_A_TIME, warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        out = nncf.quantize(model, nncf.Dataset(feeds, lambda x: {name: x}), subset_size=max(1, len(feeds)),
                            target_device=nncf.TargetDevice.CPU)
    return out.SerializeToString()
