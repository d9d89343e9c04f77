"""Protocol tests against the real worker process (``python -m engine.worker``).

Most tests drive the worker with the documented fake-pipeline seam (fast, exact step timing);
the last test runs the real pipeline on tiny random weights (tests/helpers/tiny_weights.py)
through the same worker: a result, a cancel mid-job, and a job that raises.
"""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "addon"))
from engine_setup import ENGINE_PYTHON, REPO, prepare_engine, real_pipeline_available  # noqa: E402
from helpers.paths import SHARED

IMAGE = SHARED / "images" / "0.png"


@pytest.fixture(scope="module")
def engine_setup(tmp_path_factory):
    return prepare_engine(tmp_path_factory.mktemp("engine"), "fake")


@pytest.fixture(scope="module")
def image_path(tmp_path_factory):
    if IMAGE.is_file():
        return str(IMAGE)
    from PIL import Image

    path = tmp_path_factory.mktemp("image") / "disc.png"
    picture = Image.new("RGBA", (64, 64), (0, 0, 0, 0))
    for x in range(16, 48):
        for y in range(16, 48):
            picture.putpixel((x, y), (200, 80, 40, 255))
    picture.save(path)
    return str(path)


class WorkerProcess:
    """Raw JSON-lines driver: no client library, so the tests see exactly what goes over the pipe."""

    def __init__(self, setup, log_path: Path):
        command = [ENGINE_PYTHON, "-u", "-m", "engine.worker", "--device", "cpu", "--dtype", "float32"]
        if setup.weights_dir:
            command += ["--weights", setup.weights_dir]
        env = dict(os.environ)
        env.update(setup.env)
        self.log = open(log_path, "wb")
        self.process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        stderr=self.log, env=env, cwd=str(REPO))
        self.events: queue.Queue = queue.Queue()
        self.non_json: list[str] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self):
        for raw in iter(self.process.stdout.readline, b""):
            try:
                self.events.put(json.loads(raw))
            except json.JSONDecodeError:
                self.non_json.append(raw.decode(errors="replace"))
        self.events.put(None)

    def send(self, message) -> None:
        text = message if isinstance(message, str) else json.dumps(message)
        self.process.stdin.write(text.encode() + b"\n")
        self.process.stdin.flush()

    def next_event(self, timeout: float = 60.0) -> dict:
        event = self.events.get(timeout=timeout)
        assert event is not None, "worker closed its stdout"
        return event

    def wait_for(self, predicate, timeout: float = 120.0) -> tuple[dict, list[dict]]:
        seen = []
        deadline = time.monotonic() + timeout
        while True:
            event = self.next_event(max(0.1, deadline - time.monotonic()))
            seen.append(event)
            if predicate(event):
                return event, seen

    def close(self) -> int:
        if self.process.poll() is None:
            try:
                self.send({"cmd": "shutdown", "id": "bye"})
                self.process.stdin.close()
            except (BrokenPipeError, OSError):
                pass
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log.close()
        return self.process.returncode


def steps_after_ack(seen: list[dict], job_id, cancel_id) -> int:
    """Progress events of ``job_id`` that the worker emitted after it took the cancel request.

    Events share one ordered stream, so everything after the cancel's ``ack`` happened after
    the cancel flag was set (events before it may simply have been waiting in the pipe).
    """
    acks = [index for index, e in enumerate(seen) if e.get("id") == cancel_id]
    assert acks, "the cancel request was not acknowledged"
    ack = seen[acks[0]]
    assert ack["event"] == "ack" and ack["cancelling"] is True, ack
    return sum(1 for e in seen[acks[0] + 1:] if e.get("id") == job_id and e["event"] == "progress")


@pytest.fixture
def worker(engine_setup, tmp_path):
    process = WorkerProcess(engine_setup, tmp_path / "worker.log")
    ready = process.next_event(timeout=120)
    assert ready["event"] == "ready", ready
    process.ready = ready
    yield process
    process.close()
    assert not process.non_json, f"non-protocol lines on stdout: {process.non_json[:3]}"


def test_ready_reports_environment_and_weights(worker, engine_setup):
    ready = worker.ready
    assert ready["protocol"] == 1
    assert ready["pid"] == worker.process.pid
    assert ready["torch"]  # torch imported in the engine process
    assert ready["cuda_available"] is False and ready["gpus"] == []
    assert ready["device"] == "cpu" and ready["dtype"] == "float32"
    weights = ready["weights"]
    assert weights["complete"] is False and weights["message"]  # no weights folder given


def test_malformed_requests_give_errors_and_worker_stays_usable(worker, tmp_path, image_path):
    cases = [
        ("this is not json", None, "bad_request"),
        ("[1, 2, 3]", None, "bad_request"),
        (json.dumps({"id": 7, "cmd": "fly"}), 7, "unknown_command"),
        (json.dumps({"id": 8, "cmd": "generate", "output": str(tmp_path / "m.glb")}), 8, "bad_request"),
        (json.dumps({"id": 9, "cmd": "generate", "image": str(tmp_path / "missing.png"),
                     "output": str(tmp_path / "m.glb")}), 9, "file_not_found"),
        (json.dumps({"id": 10, "cmd": "generate", "image": image_path, "output": "relative.glb"}),
         10, "bad_request"),
        (json.dumps({"id": 11, "cmd": "generate", "image": image_path, "output": str(tmp_path / "m.txt")}),
         11, "bad_request"),
        (json.dumps({"id": 12, "cmd": "generate", "image": image_path, "output": str(tmp_path / "m.glb"),
                     "settings": {"colour": "red"}}), 12, "bad_request"),
        (json.dumps({"id": 13, "cmd": "generate", "image": image_path, "output": str(tmp_path / "m.glb"),
                     "settings": {"seed": "zero"}}), 13, "bad_request"),
        (json.dumps({"id": 14, "cmd": "generate", "image": image_path, "output": str(tmp_path / "m.glb"),
                     "settings": {"resolution": 768}}), 14, "bad_request"),
    ]
    for line, expected_id, expected_code in cases:
        worker.send(line)
        event = worker.next_event(timeout=60)
        assert event["event"] == "error", (line, event)
        assert event["id"] == expected_id
        assert event["code"] == expected_code, (line, event)
        assert event["message"]
    worker.send({"id": "p", "cmd": "ping"})
    status = worker.next_event()
    assert status == {**status, "event": "status", "id": "p", "busy": False}
    assert not list(tmp_path.glob("m.*")), "rejected requests must not write files"


def test_generate_streams_progress_and_writes_mesh_files(worker, engine_setup, tmp_path, image_path):
    output = tmp_path / "out" / "mesh.glb"
    worker.send({"id": "job1", "cmd": "generate", "image": image_path, "output": str(output),
                 "settings": engine_setup.settings()})
    final, seen = worker.wait_for(lambda e: e.get("id") == "job1" and e["event"] != "progress", 300)
    assert final["event"] == "result", final
    progress = [e for e in seen if e["event"] == "progress"]
    assert progress, "no progress events"
    for event in progress:
        assert set(event) >= {"stage", "step", "total", "eta_s", "elapsed_s"}
        assert 0 <= event["step"] <= event["total"]
    stages = [e["stage"] for e in progress]
    assert stages[0] == "load"
    assert len(set(stages)) >= 2
    assert output.is_file() and Path(final["mesh"]) == output
    arrays = np.load(final["arrays"])
    assert arrays["vertices"].dtype == np.float32 and arrays["vertices"].shape == (final["vertices"], 3)
    assert arrays["faces"].dtype == np.int32 and arrays["faces"].shape == (final["faces"], 3)
    if final["faces"]:
        assert arrays["faces"].max() < final["vertices"]
    assert final["stats"]["job_seconds"] > 0
    assert final["settings"]["seed"] == 1
    # The models stay loaded: a second job does not load again.
    worker.send({"id": "job2", "cmd": "generate", "image": image_path,
                 "output": str(tmp_path / "out" / "second.npz"), "settings": engine_setup.settings()})
    final2, seen2 = worker.wait_for(lambda e: e.get("id") == "job2" and e["event"] != "progress", 300)
    assert final2["event"] == "result", final2
    assert "load" not in [e.get("stage") for e in seen2]
    assert final2["mesh"] == final2["arrays"]


def test_cancel_mid_job_stops_within_a_step(worker, engine_setup, tmp_path, image_path):
    output = tmp_path / "cancelled.glb"
    worker.send({"id": "long", "cmd": "generate", "image": image_path, "output": str(output),
                 "settings": engine_setup.settings(slow=True)})
    worker.wait_for(
        lambda e: e.get("id") == "long" and e["event"] == "progress" and e["stage"] != "load", 120)
    # A second job while busy is refused, the running one continues.
    worker.send({"id": "other", "cmd": "generate", "image": image_path,
                 "output": str(tmp_path / "other.glb"), "settings": engine_setup.settings()})
    busy, _ = worker.wait_for(lambda e: e.get("id") == "other", 30)
    assert busy["event"] == "error" and busy["code"] == "busy"
    sent = time.monotonic()
    worker.send({"id": "c1", "cmd": "cancel", "job": "long"})
    outcome, seen = worker.wait_for(
        lambda e: e.get("id") == "long" and e["event"] in ("cancelled", "result", "error"), 60)
    elapsed = time.monotonic() - sent
    assert outcome["event"] == "cancelled", outcome
    assert steps_after_ack(seen, "long", "c1") <= 1, "the job ran on for more than one step after the cancel"
    assert elapsed < 30
    assert not output.exists()
    # Cancelling when nothing runs is acknowledged, not an error.
    worker.send({"id": "c2", "cmd": "cancel"})
    ack = worker.next_event()
    assert ack["event"] == "ack" and ack["cancelling"] is False
    # The worker is still usable.
    worker.send({"id": "after", "cmd": "generate", "image": image_path,
                 "output": str(tmp_path / "after.npz"), "settings": engine_setup.settings()})
    final, _ = worker.wait_for(lambda e: e.get("id") == "after" and e["event"] != "progress", 300)
    assert final["event"] == "result"


def test_job_that_raises_reports_error_and_worker_survives(worker, engine_setup, tmp_path, image_path):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n this is not really a png")
    worker.send({"id": "bad", "cmd": "generate", "image": str(broken),
                 "output": str(tmp_path / "bad.glb"), "settings": engine_setup.settings()})
    outcome, _ = worker.wait_for(lambda e: e.get("id") == "bad" and e["event"] != "progress", 120)
    assert outcome["event"] == "error"
    assert outcome["code"] in ("bad_image", "invalid_input", "job_failed")
    assert outcome["message"]
    assert not (tmp_path / "bad.glb").exists()
    worker.send({"id": "s", "cmd": "status"})
    status, _ = worker.wait_for(lambda e: e.get("id") == "s")
    assert status["busy"] is False


def test_release_and_shutdown(worker, engine_setup, tmp_path, image_path):
    worker.send({"id": "j", "cmd": "generate", "image": image_path, "output": str(tmp_path / "r.npz"),
                 "settings": engine_setup.settings()})
    final, _ = worker.wait_for(lambda e: e.get("id") == "j" and e["event"] != "progress", 300)
    assert final["event"] == "result"
    worker.send({"id": "s1", "cmd": "status"})
    assert worker.wait_for(lambda e: e.get("id") == "s1")[0]["pipeline_loaded"] is True
    worker.send({"id": "rel", "cmd": "release"})
    ack, _ = worker.wait_for(lambda e: e.get("id") == "rel")
    assert ack == {"event": "ack", "id": "rel", "cmd": "release"}
    worker.send({"id": "s2", "cmd": "status"})
    assert worker.wait_for(lambda e: e.get("id") == "s2")[0]["pipeline_loaded"] is False
    worker.send({"id": "end", "cmd": "shutdown"})
    ack, _ = worker.wait_for(lambda e: e.get("id") == "end")
    assert ack["event"] == "ack"
    assert worker.process.wait(timeout=30) == 0


def test_worker_exits_when_stdin_closes(engine_setup, tmp_path):
    process = WorkerProcess(engine_setup, tmp_path / "eof.log")
    assert process.next_event(timeout=120)["event"] == "ready"
    process.process.stdin.close()
    assert process.process.wait(timeout=30) == 0
    process.log.close()


def test_real_tiny_pipeline_result_cancel_and_failure(tmp_path_factory, image_path):
    if not real_pipeline_available():
        pytest.skip("engine.pipeline or tests/helpers/tiny_weights.py not present")
    folder = tmp_path_factory.mktemp("tiny")
    setup = prepare_engine(folder, "tiny")
    worker = WorkerProcess(setup, folder / "worker.log")
    try:
        ready = worker.next_event(timeout=120)
        assert ready["event"] == "ready"
        assert ready["weights"]["complete"] is True, ready["weights"]
        # A job that raises inside the pipeline (unreadable image).
        broken = folder / "broken.png"
        broken.write_bytes(b"\x89PNG\r\n\x1a\n not a png")
        worker.send({"id": "bad", "cmd": "generate", "image": str(broken),
                     "output": str(folder / "bad.glb"), "settings": setup.settings()})
        failed, _ = worker.wait_for(lambda e: e.get("id") == "bad" and e["event"] != "progress", 300)
        assert failed["event"] == "error" and failed["code"] in ("bad_image", "invalid_input"), failed
        # A full job.
        worker.send({"id": "ok", "cmd": "generate", "image": image_path,
                     "output": str(folder / "ok.glb"), "settings": setup.settings()})
        final, seen = worker.wait_for(lambda e: e.get("id") == "ok" and e["event"] != "progress", 600)
        assert final["event"] == "result", final
        stages = {e["stage"] for e in seen if e["event"] == "progress"}
        assert {"dense", "sparse_512"} <= stages
        assert final["faces"] > 0 and (folder / "ok.glb").is_file()
        # Cancel during the sampler: stops within one step.
        worker.send({"id": "long", "cmd": "generate", "image": image_path,
                     "output": str(folder / "long.glb"), "settings": setup.settings(slow=True)})
        worker.wait_for(lambda e: e.get("id") == "long" and e["event"] == "progress"
                                   and e["stage"] == "dense" and e["step"] >= 1, 600)
        worker.send({"id": "c", "cmd": "cancel", "job": "long"})
        outcome, seen = worker.wait_for(
            lambda e: e.get("id") == "long" and e["event"] in ("cancelled", "result", "error"), 120)
        assert outcome["event"] == "cancelled", outcome
        assert steps_after_ack(seen, "long", "c") <= 1
    finally:
        worker.close()
    assert not worker.non_json, worker.non_json[:3]


def test_cli_entry_point_runs_the_worker():
    """``python -m engine worker`` (the documented command) reaches the same worker."""
    completed = subprocess.run(
        [ENGINE_PYTHON, "-m", "engine", "worker", "--device", "cpu"],
        input=b'{"id": "p", "cmd": "ping"}\n', capture_output=True, timeout=120, cwd=str(REPO))
    assert completed.returncode == 0, completed.stderr.decode()[-2000:]
    events = [json.loads(line) for line in completed.stdout.splitlines()]
    assert [e["event"] for e in events] == ["ready", "status"]
    assert events[1]["id"] == "p"


def test_failures_become_actionable_messages():
    from engine.worker import describe_failure

    class OutOfMemoryError(RuntimeError):
        pass

    class WeightsError(RuntimeError):
        pass

    cases = [
        (OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB"), "out_of_memory", "sequential"),
        (RuntimeError("device cuda was requested but CUDA is not available"), "no_gpu", "Device to cpu"),
        (RuntimeError("CUDA error: no kernel image is available for execution"), "gpu_unsupported", "newer CUDA"),
        (WeightsError("/w is missing model_dense.ckpt"), "weights_missing", "model_dense.ckpt"),
        (FileNotFoundError("/x.png"), "file_not_found", "/x.png"),
        (ImportError("No module named 'spconv'"), "engine_install", "spconv"),
        (ValueError("seed must be an integer"), "invalid_input", "seed must be"),
        (KeyError("boom"), "job_failed", "KeyError"),
    ]
    for exc, code, fragment in cases:
        got_code, message = describe_failure(exc)
        assert got_code == code, (exc, got_code)
        assert fragment in message, (exc, message)
