"""Property test: malformed or extreme requests each get a non-OK status of the right class, and the
server still answers a valid request afterwards."""
import json
import math

import grpc
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from conftest import served_copy
from ofa_client.v1 import subnet_service_pb2 as pb
from ofa_client.v1 import subnet_service_pb2_grpc as pb_grpc
from ofa_server.main import ServeConfig, Server
from ofa_server.registry import Registry

TARGET = "synthetic-cpu"
INVALID, NOT_FOUND, PRECONDITION = (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
                                    grpc.StatusCode.FAILED_PRECONDITION)


@pytest.fixture(scope="module")
def stub(tiny_artifact, tmp_path_factory):
    root = served_copy(tiny_artifact, tmp_path_factory.mktemp("fuzz") / "tiny", TARGET)
    srv = Server(Registry([str(root)]), ServeConfig(port=0, max_searches=4)).start()
    channel = grpc.insecure_channel(f"127.0.0.1:{srv.port}")
    yield pb_grpc.SubnetServiceStub(channel)
    channel.close()
    srv.stop(0)


names = st.text(min_size=1, max_size=70)
bad_numbers = st.one_of(st.floats(max_value=0.0), st.just(math.nan), st.just(math.inf), st.just(-math.inf),
                        st.floats(min_value=1e6 + 1, exclude_min=True, allow_infinity=False))
bad_ints = st.one_of(st.integers(max_value=0, min_value=-(2**63)), st.integers(min_value=10**13 + 1, max_value=2**63 - 1))


@st.composite
def bad_search(draw):
    """(request, expected code): a search request with exactly one thing wrong."""
    req = pb.SearchSubnetRequest(target=TARGET, options=pb.SearchOptions(generations=3, population=4))
    kind = draw(st.sampled_from(["supernet", "target", "latency", "macs", "params", "tiny_macs", "resolutions",
                                 "accuracy", "population", "generations", "latency_no_target"]))
    if kind == "supernet":
        req.supernet = draw(names.filter(lambda s: s != "tiny"))
        return req, NOT_FOUND
    if kind == "target":
        t = draw(names.filter(lambda s: s != TARGET))
        req.target = t
        ok_chars = len(t) <= 64 and not t.startswith(".") and all(c.isascii() and (c.isalnum() or c in "-_.") for c in t)
        return req, NOT_FOUND if ok_chars else INVALID
    if kind == "latency":
        req.constraints.max_latency_ms = draw(bad_numbers)
    elif kind == "latency_no_target":
        req.target = ""
        req.constraints.max_latency_ms = draw(st.floats(min_value=0.1, max_value=10))
    elif kind in ("macs", "params"):
        setattr(req.constraints, f"max_{kind}", draw(bad_ints))
    elif kind == "tiny_macs":
        req.constraints.max_macs = draw(st.integers(min_value=1, max_value=3_000_000))
        return req, PRECONDITION
    elif kind == "resolutions":
        req.constraints.resolutions.extend(draw(st.lists(st.integers(-(2**31), 2**31 - 1).filter(
            lambda r: r not in (24, 28)), min_size=1, max_size=5)))
    elif kind == "accuracy":
        req.constraints.min_accuracy = draw(st.one_of(st.floats(max_value=-1e-9), st.floats(min_value=100.0001),
                                                      st.just(math.nan)))
    else:
        hi = 1000 if kind == "population" else 2000
        extra = [st.just(1)] if kind == "population" else []  # 0 means "the default"; 1 is too small
        setattr(req.options, kind, draw(st.one_of(st.integers(-(2**31), -1), st.integers(hi + 1, 2**31 - 1), *extra)))
    return req, INVALID


@st.composite
def bad_weights(draw):
    req = pb.GetSubnetWeightsRequest(format=pb.WEIGHTS_FORMAT_SAFETENSORS)
    kind = draw(st.sampled_from(["format", "arch", "id", "unknown_id", "nothing", "mismatch"]))
    small = st.integers(-(2**31), 2**31 - 1)
    if kind == "format":
        req.format = draw(st.integers(-(2**31), 2**31 - 1).filter(lambda f: f not in (1, 2, 3)))
        req.subnet_id = "0" * 16
        return req, INVALID
    if kind == "arch":
        arch = pb.Arch(kernel=draw(st.lists(small, max_size=30)), expand=draw(st.lists(small, max_size=30)),
                       depth=draw(st.lists(st.integers(-5, 9), max_size=7)), resolution=draw(small))
        arch.kernel.append(draw(st.sampled_from([0, 1, 2, 4, 6, 9, -3])))  # never a valid kernel size
        req.arch.CopyFrom(arch)
        return req, INVALID
    if kind == "id":
        req.subnet_id = draw(st.text(min_size=1, max_size=40).filter(
            lambda s: len(s) != 16 or any(c not in "0123456789abcdef" for c in s)))
        return req, INVALID
    if kind == "unknown_id":
        req.subnet_id = draw(st.text("0123456789abcdef", min_size=16, max_size=16))
        return req, NOT_FOUND
    if kind == "mismatch":
        req.subnet_id = "f" * 16
        req.arch.CopyFrom(pb.Arch(kernel=[3] * 10, expand=[3] * 10, depth=[2] * 5, resolution=24))
        return req, INVALID
    return req, INVALID  # neither id nor arch


@st.composite
def bad_other(draw):
    kind = draw(st.sampled_from(["table", "table_obj", "front_points", "targets_supernet"]))
    if kind == "table":
        return "RegisterTarget", pb.RegisterTargetRequest(table_json=draw(st.text(max_size=200))), INVALID
    if kind == "table_obj":
        obj = draw(st.dictionaries(st.sampled_from(["format", "version", "target", "space", "device", "entries"]),
                                   st.one_of(st.none(), st.integers(), st.text(max_size=10)), max_size=6))
        return "RegisterTarget", pb.RegisterTargetRequest(table_json=json.dumps(obj)), INVALID
    if kind == "front_points":
        pts = draw(st.one_of(st.integers(-(2**31), -1), st.integers(51, 2**31 - 1)))
        return "GetParetoFront", pb.GetParetoFrontRequest(target=TARGET, points=pts), INVALID
    return "ListTargets", pb.ListTargetsRequest(supernet=draw(names.filter(lambda s: s != "tiny"))), NOT_FOUND


requests = st.one_of(bad_search().map(lambda r: ("SearchSubnet",) + r), bad_weights().map(lambda r: ("GetSubnetWeights",) + r),
                     bad_other())


@settings(max_examples=1200, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(case=requests)
def test_malformed_requests_get_the_right_status(stub, case):
    method, request, expected = case
    call = getattr(stub, method)
    with pytest.raises(grpc.RpcError) as e:
        result = call(request, timeout=30)
        if method == "GetSubnetWeights":
            list(result)
    assert e.value.code() == expected, (request, e.value.details())
    assert e.value.details() and "Traceback" not in e.value.details()


def test_the_server_still_answers_after_the_fuzzing(stub):
    best = stub.SearchSubnet(pb.SearchSubnetRequest(target=TARGET, constraints=pb.Constraints(max_latency_ms=2.5)))
    assert best.predicted_latency_ms <= 2.5
    chunks = list(stub.GetSubnetWeights(pb.GetSubnetWeightsRequest(subnet_id=best.id, format=1)))
    assert chunks[0].HasField("header") and sum(len(c.chunk) for c in chunks[1:]) == chunks[0].header.total_bytes


@st.composite
def long_field(draw):
    """A request with one field of at least 1 MiB: every RPC echoes some field in its message."""
    text = draw(st.sampled_from("xé.%{")) * draw(st.integers(1 << 20, 2 << 20))
    kind = draw(st.sampled_from(["target", "supernet", "id", "table", "timing", "targets"]))
    if kind == "target":
        return "SearchSubnet", pb.SearchSubnetRequest(target=text)
    if kind == "supernet":
        return "SearchSubnet", pb.SearchSubnetRequest(supernet=text, target=TARGET)
    if kind == "id":
        return "GetSubnetWeights", pb.GetSubnetWeightsRequest(subnet_id=text, format=1)
    if kind == "table":
        return "RegisterTarget", pb.RegisterTargetRequest(table_json=text)
    if kind == "timing":
        return "SearchSubnet", pb.SearchSubnetRequest(target=TARGET, reference_timings=[
            pb.ReferenceTiming(subnet_id=text, ms=1.0)])
    return "ListTargets", pb.ListTargetsRequest(supernet=text)


@settings(max_examples=24, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                 HealthCheck.function_scoped_fixture])
@given(case=long_field())
def test_long_fields_are_never_echoed_whole(stub, case, caplog):
    method, request = case
    caplog.clear()
    with caplog.at_level("INFO", logger="ofa_server"):
        with pytest.raises(grpc.RpcError) as e:
            result = getattr(stub, method)(request, timeout=60)
            if method == "GetSubnetWeights":
                list(result)
    assert e.value.code() in (INVALID, NOT_FOUND), e.value.details()[:300]
    assert 0 < len(e.value.details()) <= 1000
    lines = [r.getMessage() for r in caplog.records]
    assert lines and all(len(line) <= 1200 for line in lines), max(map(len, lines))


def test_a_message_listing_many_targets_is_cut_to_the_cap(tiny_artifact, tmp_path, caplog):
    from conftest import synthetic_table
    from ofa.artifact import load_artifact
    from ofa_client import Client, NotFound

    root = served_copy(tiny_artifact, tmp_path / "tiny", TARGET)
    srv = Server(Registry([str(root)]), ServeConfig(port=0, max_searches=1, max_message_chars=500)).start()
    try:
        with Client(f"127.0.0.1:{srv.port}") as c:
            space = load_artifact(root).space
            for k in range(40):  # NOT_FOUND names every known target: 40 x 60 characters
                c.register_target(synthetic_table(space, f"{'device-' * 7}{k:04d}"[:60]))
            caplog.clear()
            with caplog.at_level("INFO", logger="ofa_server"), pytest.raises(NotFound) as e:
                c.search("no-such-device")
        assert len(e.value.details) <= 500 and "more characters cut" in e.value.details
        assert "no-such-device" in e.value.details
        assert all(len(r.getMessage()) <= 600 for r in caplog.records)
    finally:
        srv.stop(0)
