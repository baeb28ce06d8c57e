"""Requests the server refuses, and servers the client refuses: tables of named cases, a property test
(malformed or extreme requests each get a non-OK status of the right class, and the server still answers a
valid request afterwards), and lying servers whose headers the client checks."""
import json
import math
import re

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings, strategies as st

from conftest import served_copy, synthetic_table, until
from ofa.artifact import load_artifact
from ofa_client import AlreadyExists, Client, Infeasible, InvalidArgument, NotFound
from ofa_client.cli import _line
from ofa_client.v1 import subnet_service_pb2 as pb
from ofa_client.v1 import subnet_service_pb2_grpc as pb_grpc
from ofa_server.main import ServeConfig, Server
from ofa_server.registry import Registry

TARGET = "synthetic-cpu"
INVALID, NOT_FOUND, PRECONDITION = (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
                                    grpc.StatusCode.FAILED_PRECONDITION)


@pytest.fixture(scope="module")
def root(tiny_artifact, tmp_path_factory):
    return served_copy(tiny_artifact, tmp_path_factory.mktemp("fuzz") / "tiny", TARGET)


@pytest.fixture(scope="module")
def server(root):
    srv = Server(Registry([str(root)]), ServeConfig(port=0, max_searches=4)).start()
    yield srv
    srv.stop(0)


@pytest.fixture(scope="module")
def stub(server):
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    yield pb_grpc.SubnetServiceStub(channel)
    channel.close()


@pytest.fixture()
def client(server):
    with Client(f"127.0.0.1:{server.port}", timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def space(root):
    return load_artifact(root).space


BAD_REQUESTS = [  # (a call of the client, the error it raises, its message)
    pytest.param(lambda c: c.search(supernet="nope"), NotFound,
                 "supernet 'nope' is not served here; known: \\['tiny'\\]", id="unknown-supernet"),
    pytest.param(lambda c: c.search("pixel"), NotFound, "target 'pixel' is not known.*synthetic-cpu",
                 id="unknown-target"),
    pytest.param(lambda c: c.search(max_macs=10), Infeasible,
                 "max_macs = 10 is below the smallest achievable 3,509,840 MACs", id="infeasible"),
    pytest.param(lambda c: c.search(max_latency_ms=1.0), InvalidArgument,
                 "constraints.max_latency_ms needs a target", id="latency-without-target"),
    pytest.param(lambda c: c.search(resolutions=[32]), InvalidArgument,
                 r"constraints.resolutions must be distinct values from \[24, 28\]", id="unknown-resolution"),
    pytest.param(lambda c: c.search(population=5000), InvalidArgument, "options.population must be in 2..1000",
                 id="population-too-large"),
    pytest.param(lambda c: c.pareto(points=50, population=1000, generations=2000), InvalidArgument,
                 r"population x options.generations x points must be at most 5,000,000 \(--max-search-work\), "
                 r"got 1000 x 2000 x 50 = 100,000,000", id="too-much-work"),
    pytest.param(lambda c: c.fetch({"kernel": [4], "expand": [3], "depth": [1], "resolution": 28}), InvalidArgument,
                 "arch: ", id="invalid-arch"),
    pytest.param(lambda c: c.fetch("0123456789abcdef"), NotFound, "subnet 0123456789abcdef is not known",
                 id="unknown-subnet-id"),
]


@pytest.mark.parametrize("call, error, message", BAD_REQUESTS)
def test_bad_requests_get_the_right_status(client, call, error, message):
    with pytest.raises(error, match=message):
        call(client)


def test_an_unknown_weights_format_is_invalid_argument(stub):
    with pytest.raises(grpc.RpcError) as e:
        list(stub.GetSubnetWeights(pb.GetSubnetWeightsRequest(subnet_id="0123456789abcdef", format=9)))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "format must be one of" in e.value.details()


BAD_TABLES = [  # (how to spoil a valid table of target "refused-x", error, message)
    pytest.param(lambda table, space: synthetic_table(space, TARGET), AlreadyExists, "ships with the supernet",
                 id="artifact-target"),
    pytest.param(lambda table, space: "{not json", InvalidArgument, "table_json is not valid JSON", id="not-json"),
    pytest.param(lambda table, space: {**table, "space": {"name": "x", "digest": "0" * 64}}, InvalidArgument,
                 "digest mismatch", id="other-space"),
    pytest.param(lambda table, space: {**table, "entries": dict(list(table["entries"].items())[:5])},
                 InvalidArgument, "entries lack", id="missing-entries"),
    pytest.param(lambda table, space: {**table, "device": {"threads": "four"}}, InvalidArgument,
                 "device.threads must be an integer in 1..1024", id="bad-device"),
    pytest.param(lambda table, space: '{"a": ' + "[" * 100_000 + "]" * 100_000 + "}", InvalidArgument,
                 "nests too deeply", id="nested-too-deep"),
    # as deep as json.loads still parses: it was kept, then every search pickling it to a worker failed and
    # kept that worker busy for good (two such searches took the whole pool)
    pytest.param(lambda table, space: json.dumps(table)[:-1] + ', "timing": {"repeatability": '
                 + '{"a": ' * 980 + "1" + "}" * 980 + "}}", InvalidArgument, "at most 16 deep", id="nested-980"),
    pytest.param(lambda table, space: {**table, "timing": {"repeatability": {"trusted": False, "verdict": "v" * 5000}}},
                 InvalidArgument, "verdict must be a string of at most 1000", id="long-verdict"),  # said in answers
    pytest.param(lambda table, space: {**table, "model": {**table["model"], "offset_ms": {
        f"0{r}": 0.0 for r in space.resolutions}}}, InvalidArgument, "not '028'", id="padded-resolution"),
    pytest.param(lambda table, space: {**table, "entries": {k: 1e308 for k in table["entries"]}}, InvalidArgument,
                 r"milliseconds in \(0, 1e\+06\]", id="huge-entries"),
]


@pytest.mark.parametrize("spoil, error, message", BAD_TABLES)
def test_a_bad_table_is_refused_and_not_kept(client, space, spoil, error, message):
    with pytest.raises(error, match=message):
        client.register_target(spoil(synthetic_table(space, "refused-x", seed=5), space))
    assert "refused-x" not in [x["name"] for x in client.targets()]


def _timings(client, factor):
    (t,) = [t for t in client.targets() if t["name"] == TARGET]
    return {r["subnet_id"]: factor * r["profiled_ms"] for r in t["references"]}


def test_a_search_carries_the_device_speed_now(client):
    # the device runs twice as long today: a 2.5 ms budget is then the 1.25 ms subnet of the table
    half = client.search(TARGET, max_latency_ms=1.25, seed=3)
    slow = client.search(TARGET, max_latency_ms=2.5, seed=3, reference_timings=_timings(client, 2.0))
    assert half.speed == 1.0 and slow.speed == pytest.approx(2.0)
    assert slow.id == half.id and slow.predicted_latency_ms == pytest.approx(2 * half.predicted_latency_ms, rel=1e-3)
    front = client.pareto(TARGET, 3, reference_timings=_timings(client, 0.5))
    assert all(p.speed == pytest.approx(0.5) for p in front)
    assert (slow.speed_passes, slow.speed_spread, slow.speed_unsettled) == (1, 0.0, False)


def test_a_search_says_when_the_passes_that_timed_the_speed_disagreed(client):
    # the references timed in three passes, the machine at x0.9, x1.1 and x1.0 of its profiled speed
    rows = [{"subnet_id": k, "ms": ms * f, "pass_index": i}
            for i, f in enumerate((0.9, 1.1, 1.0)) for k, ms in _timings(client, 1.0).items()]
    s = client.search(TARGET, max_latency_ms=2.5, seed=3, reference_timings=rows)
    assert s.speed == pytest.approx(1.0) and s.speed_passes == 3 and s.speed_spread == pytest.approx(0.2, abs=1e-6)
    assert s.speed_unsettled and s.to_dict()["speed_spread"] == pytest.approx(0.2, abs=1e-6)
    assert "SPEED UNSETTLED: its 3 timing passes lay 20.0% apart" in _line(s)  # what ofa-client search prints
    calm = client.search(TARGET, max_latency_ms=2.5, seed=3, reference_timings=rows[len(rows) // 3:])
    assert calm.speed_passes == 2 and calm.speed_spread == pytest.approx(0.1 / 1.05, abs=1e-6)
    (t,) = [t for t in client.targets() if t["name"] == TARGET]
    assert (t["speed_spread"], t["speed_passes"]) == (0.0, 0)  # never recalibrated


@pytest.mark.parametrize("timings, message", [
    ({"0123456789abcdef": 1.0}, r"reference_timings\[0\].subnet_id '0123456789abcdef' is not a reference subnet"),
    ("nan", r"reference_timings\[0\].ms must be a number in \[1e-06, 1e\+06\]"),
    ("zero", r"reference_timings\[0\].ms must be a number"),
    ("denormal", r"reference_timings\[0\].ms must be a number in \[1e-06, 1e\+06\], got 5e-324"),
    ("twice", r"reference_timings\[1\].subnet_id [0-9a-f]{16} is given twice in pass 0"),
    ("pass 16", r"reference_timings\[0\].pass_index must be in \[0, 15\], got 16"),
    ("1000x", r"imply the device runs at x1000.000 of its profiled time; only x0.01 to x100 is accepted"),
    ("no target", "reference_timings needs a target"),
], ids=["unknown-id", "nan", "zero", "denormal", "twice", "pass-16", "implausible", "no-target"])
def test_bad_reference_timings_are_refused(client, timings, message):
    good = _timings(client, 1.0)
    first = next(iter(good))
    target = None if timings == "no target" else TARGET
    if isinstance(timings, str):
        timings = {"nan": {first: float("nan")}, "zero": {first: 0.0}, "denormal": {first: 5e-324}, "1000x": _timings(client, 1000.0),
                   "twice": [{"subnet_id": first, "ms": 1.0}] * 2, "no target": good,
                   "pass 16": [{"subnet_id": first, "ms": 1.0, "pass_index": 16}]}[timings]
    with pytest.raises(InvalidArgument, match=message):
        client.search(target, max_macs=10**9, reference_timings=timings)


@pytest.mark.parametrize("request_of, message", [
    (lambda: pb.SearchSubnetRequest(constraints=pb.Constraints(max_macs=10**9, resolutions=[24] * 3_000_000)),
     r"constraints.resolutions must be distinct values from \[.*\], got 3000000 values"),
    (lambda: pb.GetSubnetWeightsRequest(arch=pb.Arch(kernel=[3] * 3_000_000, resolution=24),
                                        format=pb.WEIGHTS_FORMAT_ONNX),
     r"arch.kernel must hold at most \d+ values for space .*, got 3000000"),
], ids=["resolutions", "arch"])
def test_a_long_repeated_field_is_refused_by_its_length_before_its_elements_are_walked(stub, request_of, message):
    request = request_of()  # ~3-15 MB on the wire, under the 16 MiB message bound
    call = stub.SearchSubnet if isinstance(request, pb.SearchSubnetRequest) else stub.GetSubnetWeights
    with pytest.raises(grpc.RpcError) as e:
        response = call(request, timeout=60)
        list(response) if not isinstance(request, pb.SearchSubnetRequest) else None
    assert e.value.code() == INVALID and re.search(message, e.value.details()), e.value.details()


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


# every format the API names (1-3 before 1.4 added the int8 ones: the fuzzer once drew 4, a valid format, and
# expected INVALID_ARGUMENT for it); UNSPECIFIED (0) is no format
_NAMED_FORMATS = {value for _, value in pb.WeightsFormat.items() if value}


@st.composite
def bad_weights(draw):
    req = pb.GetSubnetWeightsRequest(format=pb.WEIGHTS_FORMAT_SAFETENSORS)
    kind = draw(st.sampled_from(["format", "arch", "id", "unknown_id", "nothing", "mismatch"]))
    small = st.integers(-(2**31), 2**31 - 1)
    if kind == "format":
        req.format = draw(st.integers(-(2**31), 2**31 - 1).filter(lambda f: f not in _NAMED_FORMATS))
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


def test_health_watch_is_bounded_and_forgets_ended_streams(server):
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        streams = []
        for k in range(server.health.max_watches):  # one by one: calls waiting for their requests together are
            s = stub.Watch(health_pb2.HealthCheckRequest(service=f"name-{k}"))  # bounded per connection
            assert next(s).status == health_pb2.HealthCheckResponse.SERVICE_UNKNOWN
            streams.append(s)
        with pytest.raises(grpc.RpcError) as e:  # one more at once is refused
            next(stub.Watch(health_pb2.HealthCheckRequest(service="one-more")))
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        for s in streams:
            s.cancel()
        until(lambda: not server.health.watched_services(), 10, "the ended watches forgotten")
        for service in ("x" * (1 << 20), "y" * 201):  # names are capped; the message is not an echo
            for call in (stub.Check, lambda r: next(stub.Watch(r))):
                with pytest.raises(grpc.RpcError) as e:
                    call(health_pb2.HealthCheckRequest(service=service))
                assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and len(e.value.details()) < 200
        watch = stub.Watch(health_pb2.HealthCheckRequest(service=""))
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
        watch.cancel()


def test_a_watch_whose_call_ended_before_it_was_set_up_is_not_kept(server):
    """grpc refuses a callback on a call that has already ended; the stock servicer ignored that and kept such a
    watch counted for ever (16 of them took every slot from probes without a token)."""
    import threading

    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)

        def watch(timeout: float) -> None:
            try:
                next(stub.Watch(health_pb2.HealthCheckRequest(service=""), timeout=timeout))
            except grpc.RpcError:
                pass

        for _ in range(15):  # waves of 40 at once, deadlines of 0.5-10 ms: some end while being set up
            wave = [threading.Thread(target=watch, args=(0.0005 * (1 + k % 20),)) for k in range(40)]
            for t in wave:
                t.start()
            for t in wave:
                t.join()
        until(lambda: not server.health.watched_services(), 10, "every ended watch forgotten")
        watch = stub.Watch(health_pb2.HealthCheckRequest(service=""))
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
        watch.cancel()


def test_a_message_listing_many_targets_is_cut_to_the_cap(tiny_artifact, tmp_path, caplog):
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


class _LyingServer:
    """A SubnetService whose GetSubnetWeights lies in one way (``mode``), on 127.0.0.1."""

    def __init__(self, mode: str):
        from concurrent import futures

        import grpc
        from ofa_client.v1 import API_VERSION
        from ofa_client.v1 import subnet_service_pb2 as pb
        from ofa_client.v1 import subnet_service_pb2_grpc as pb_grpc

        class Lying(pb_grpc.SubnetServiceServicer):
            def ListSupernets(self, request, context):  # the client's version check before its first call
                return pb.ListSupernetsResponse(api_version=API_VERSION)

            def GetSubnetWeights(self, request, context):
                data = b"x" * 10
                header = pb.WeightsHeader(format=request.format, total_bytes=len(data), subnet_id=request.subnet_id,
                                          arch=request.arch, sha256=__import__("hashlib").sha256(data).hexdigest())
                if mode == "huge":
                    header.total_bytes = 1 << 40
                elif mode == "other_id":
                    header.subnet_id = "f" * 16
                elif mode == "other_format":
                    header.format = pb.WEIGHTS_FORMAT_ONNX
                elif mode == "other_arch":
                    header.arch.resolution = 28
                yield pb.GetSubnetWeightsResponse(header=header)
                if mode == "two_headers":
                    yield pb.GetSubnetWeightsResponse(header=header)
                yield pb.GetSubnetWeightsResponse(chunk=data)

        self.server = grpc.server(futures.ThreadPoolExecutor(2))
        pb_grpc.add_SubnetServiceServicer_to_server(Lying(), self.server)
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()

    def close(self):
        self.server.stop(0)


@pytest.mark.parametrize("mode, message", [
    ("huge", "accepts 0..1048576"), ("two_headers", "a second header"), ("other_id", "the header says 'ffff"),
    ("other_format", "asked for format 1, the header says 2"), ("other_arch", "not the arch asked for")])
def test_the_client_trusts_no_header(mode, message):
    from ofa_client import IntegrityError

    liar = _LyingServer(mode)
    arch = {"kernel": [3] * 10, "expand": [3] * 10, "depth": [2] * 5, "resolution": 24}
    try:
        with Client(f"127.0.0.1:{liar.port}", max_download_bytes=1 << 20) as c:
            with pytest.raises(IntegrityError, match=message):
                c.fetch({"id": "0123456789abcdef", "arch": arch, "supernet": "x"}, "safetensors")
    finally:
        liar.close()


def test_saving_weights_never_follows_a_planted_temp_link(tmp_path):
    from ofa_client.client import Weights

    victim = tmp_path / "victim"
    victim.write_bytes(b"keep me")
    out = tmp_path / "m.onnx"
    (tmp_path / ".m.onnx.part").symlink_to(victim)  # the temp name the client used to write through
    w = Weights(b"weights", "onnx", "0" * 64, "0" * 16, {}, (1,), (0.0,), (1.0,), "")
    assert w.save(out) == out and out.read_bytes() == b"weights" and victim.read_bytes() == b"keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".m.onnx.part", "m.onnx", "victim"]  # nothing new left
