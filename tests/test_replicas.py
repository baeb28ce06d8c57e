"""Two `ofa serve` replicas behind one client address, sharing a targets folder (issue 22)."""
import json
import signal
import threading
import time

import pytest

from conftest import served_copy, synthetic_table
from ofa.artifact import load_artifact
from ofa.jobs.service import ServerProcess
from ofa_client import Client

TARGET = "synthetic-cpu"


@pytest.mark.slow
def test_two_replicas_answer_as_one_service_and_one_may_die(tiny_artifact, tmp_path):
    art = served_copy(tiny_artifact, tmp_path / "tiny", TARGET)
    shared = ["--targets-dir", str(tmp_path / "targets"), "--max-searches", "1"]
    with ServerProcess([art], tmp_path / "a.log", extra=shared) as a, \
            ServerProcess([art], tmp_path / "b.log", extra=shared) as b:
        both = f"ipv4:{a.address},{b.address}"
        table = synthetic_table(load_artifact(art).space, "phone-r", seed=7)
        with Client(both, timeout=120) as c:
            c.register_target(json.dumps(table))  # through one of them
            ids = {c.search(target="phone-r", seed=1).id for _ in range(4)}  # round robin: both answer
        assert len(ids) == 1
        # the same request, each replica asked on its own: the same subnet and the same bytes
        answers = []
        for address in (a.address, b.address):
            with Client(address, timeout=120) as c:
                best = c.search(target="phone-r", seed=1)
                answers.append((best.id, c.fetch(best, "safetensors").sha256, c.fetch(best, "onnx").sha256))
        assert answers[0] == answers[1] and answers[0][0] in ids
        # one replica killed while the client keeps asking (from another thread, 50 ms into the fourth call,
        # so that a call may be in flight on it): every call is answered (UNAVAILABLE is re-sent)
        with Client(both, timeout=120, retries=3) as c:
            got, third = [], threading.Event()

            def kill_b():
                third.wait(120)
                time.sleep(0.05)
                b.proc.send_signal(signal.SIGKILL)

            killer = threading.Thread(target=kill_b)
            killer.start()
            for i in range(8):
                got.append(c.search(target="phone-r", seed=1).id)
                if i == 2:
                    third.set()
            killer.join()
        assert b.proc.wait(30) == -signal.SIGKILL and set(got) == ids and len(got) == 8
