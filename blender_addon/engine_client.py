"""Client side of the engine worker protocol (see docs/protocol.md).

Pure Python: no bpy, no torch. It starts ``python -m engine worker`` as a child process,
writes JSON requests to its stdin, and reads its stdout on a daemon thread into a queue, so
the caller (a modal operator's timer, or a blocking loop in background mode) drains events
without ever blocking Blender's main thread. The worker's stderr is copied to a log file and
its last lines are kept for error messages when the worker dies.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import json
import os
import queue
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterable

STDERR_TAIL_LINES = 40
LOG_ROTATE_BYTES = 5 * 2**20  # the engine log is moved to <name>.1 beyond this size
ENGINE_EXIT_EVENT = "engine_exit"  # synthesised by the client when stdout closes


class EngineError(Exception):
    """The engine could not do what was asked; the message is meant for the user."""


class EngineDied(EngineError):
    """The worker process exited while the client still needed it."""


@dataclasses.dataclass
class EngineConfig:
    python: str                        # the engine's interpreter (a venv with torch)
    engine_path: str = ""              # folder holding the ``engine`` package, if not installed
    weights_dir: str = ""
    device: str = "cuda"
    dtype: str = "float16"
    memory_mode: str = "resident"
    log_path: str = ""                 # worker stderr goes here (appended)
    extra_env: dict = dataclasses.field(default_factory=dict)

    def command(self) -> list[str]:
        # -s: ignore the user site-packages so stray packages do not shadow the engine's.
        # ``-m engine.worker`` is the same entry point as ``python -m engine worker``.
        command = [self.python, "-s", "-u", "-m", "engine.worker",
                   "--device", self.device, "--dtype", self.dtype,
                   "--memory-mode", self.memory_mode]
        if self.weights_dir:
            command += ["--weights", self.weights_dir]
        return command

    def environment(self) -> dict:
        env = dict(os.environ)
        for name in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP"):
            env.pop(name, None)
        env["PYTHONNOUSERSITE"] = "1"
        env["PYTHONUNBUFFERED"] = "1"
        env["PYTHONIOENCODING"] = "utf-8"
        if self.engine_path:
            env["PYTHONPATH"] = self.engine_path
        env.update({str(k): str(v) for k, v in self.extra_env.items()})
        return env

    def validate(self) -> None:
        if not self.python:
            raise EngineError("No engine Python interpreter is set. Choose the Python of the "
                              "environment where the engine is installed in the add-on preferences.")
        if not Path(self.python).is_file():
            raise EngineError(f"The engine Python interpreter does not exist: {self.python}")
        if self.engine_path and not (Path(self.engine_path) / "engine").is_dir():
            raise EngineError(f"The engine folder {self.engine_path} has no 'engine' package in it.")
        if self.weights_dir and not Path(self.weights_dir).is_dir():
            raise EngineError(f"The weights folder does not exist: {self.weights_dir}")


class EngineClient:
    """One worker process and the stream of events it sends."""

    def __init__(self, config: EngineConfig):
        self.config = config
        self.process: subprocess.Popen | None = None
        self.events: queue.Queue = queue.Queue()
        self.ready_info: dict | None = None
        self.exit_code: int | None = None
        self._stderr_tail: collections.deque = collections.deque(maxlen=STDERR_TAIL_LINES)
        self._write_lock = threading.Lock()
        self._ids = itertools.count(1)
        self._threads: list[threading.Thread] = []

    # ---- lifetime ------------------------------------------------------------------

    def start(self) -> None:
        self.config.validate()
        log_file = None
        if self.config.log_path:
            log_path = Path(self.config.log_path)
            log_path.parent.mkdir(parents=True, exist_ok=True)
            if log_path.is_file() and log_path.stat().st_size > LOG_ROTATE_BYTES:
                os.replace(log_path, log_path.with_name(log_path.name + ".1"))
            log_file = open(self.config.log_path, "a", encoding="utf-8", errors="replace")
            log_file.write(f"\n--- engine started {time.strftime('%Y-%m-%d %H:%M:%S')}: "
                           f"{' '.join(self.config.command())}\n")
            log_file.flush()
        creation_flags = getattr(subprocess, "CREATE_NO_WINDOW", 0) if sys.platform == "win32" else 0
        try:
            # Default buffering on purpose: an unbuffered pipe makes readline() byte-by-byte.
            self.process = subprocess.Popen(
                self.config.command(),
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env=self.config.environment(),
                cwd=self.config.engine_path or None,
                creationflags=creation_flags,
            )
        except OSError as exc:
            if log_file is not None:
                log_file.close()
            raise EngineError(f"Could not start the engine ({self.config.python}): {exc}") from exc
        stdout_thread = threading.Thread(target=self._read_stdout, name="engine-stdout", daemon=True)
        stderr_thread = threading.Thread(target=self._read_stderr, args=(log_file,),
                                         name="engine-stderr", daemon=True)
        self._threads = [stdout_thread, stderr_thread]
        stderr_thread.start()
        stdout_thread.start()

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None and self.exit_code is None

    def stderr_tail(self) -> str:
        return "\n".join(self._stderr_tail)

    def death_message(self) -> str:
        code = self.exit_code if self.exit_code is not None else (
            self.process.poll() if self.process is not None else None)
        tail = self.stderr_tail().strip().splitlines()[-8:]
        message = f"The engine stopped unexpectedly (exit code {code})."
        if tail:
            message += " Last log lines: " + " | ".join(line.strip() for line in tail)
        if self.config.log_path:
            message += f" Full log: {self.config.log_path}"
        return message

    def _read_stdout(self) -> None:
        stream = self.process.stdout
        for raw in iter(stream.readline, b""):
            text = raw.decode("utf-8", errors="replace").strip()
            if not text:
                continue
            try:
                event = json.loads(text)
            except json.JSONDecodeError:
                self._stderr_tail.append(f"[non-protocol stdout] {text}")
                continue
            if isinstance(event, dict):
                if event.get("event") == "ready":
                    self.ready_info = event
                self.events.put(event)
        code = self.process.wait()
        # Give the stderr reader a moment so the death message has the last lines.
        if len(self._threads) > 1:
            self._threads[1].join(timeout=2.0)
        self.exit_code = code
        self.events.put({"event": ENGINE_EXIT_EVENT, "returncode": code})

    def _read_stderr(self, log_file) -> None:
        try:
            for raw in iter(self.process.stderr.readline, b""):
                text = raw.decode("utf-8", errors="replace").rstrip("\n")
                self._stderr_tail.append(text)
                if log_file is not None:
                    log_file.write(text + "\n")
                    log_file.flush()
        finally:
            if log_file is not None:
                log_file.close()

    # ---- requests ------------------------------------------------------------------

    def new_id(self, prefix: str = "r") -> str:
        return f"{prefix}{next(self._ids)}"

    def send(self, command: str, **fields: Any) -> str:
        if not self.running:
            raise EngineDied(self.death_message())
        request_id = fields.pop("id", None) or self.new_id()
        message = {"id": request_id, "cmd": command}
        message.update(fields)
        data = (json.dumps(message) + "\n").encode("utf-8")
        with self._write_lock:
            try:
                self.process.stdin.write(data)
                self.process.stdin.flush()
            except (BrokenPipeError, OSError, ValueError) as exc:
                raise EngineDied(self.death_message()) from exc
        return request_id

    def drain(self) -> list[dict]:
        """Every event received so far, without waiting."""
        drained = []
        while True:
            try:
                drained.append(self.events.get_nowait())
            except queue.Empty:
                return drained

    def next_event(self, timeout: float | None) -> dict | None:
        try:
            return self.events.get(timeout=timeout)
        except queue.Empty:
            return None

    def wait_for(self, predicate: Callable[[dict], bool], timeout: float) -> dict:
        """Block until an event satisfies ``predicate``; other events are dropped."""
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise EngineError(f"The engine did not answer within {timeout:.0f} s.")
            event = self.next_event(min(remaining, 0.5))
            if event is None:
                continue
            if event.get("event") == ENGINE_EXIT_EVENT:
                raise EngineDied(self.death_message())
            if predicate(event):
                return event

    def wait_ready(self, timeout: float = 120.0) -> dict:
        if self.ready_info is not None:
            return self.ready_info
        return self.wait_for(lambda e: e.get("event") == "ready", timeout)

    def request(self, command: str, timeout: float = 30.0, **fields: Any) -> dict:
        """Send a short command and wait for its reply (ack, status or error)."""
        request_id = self.send(command, **fields)
        reply = self.wait_for(lambda e: e.get("id") == request_id, timeout)
        if reply.get("event") == "error":
            raise EngineError(reply.get("message", "the engine reported an error"))
        return reply

    def start_job(self, image: str, output: str, settings: dict) -> "Job":
        job = Job(self.new_id("job"), image=image, output=output, settings=dict(settings))
        self.send("generate", id=job.id, image=image, output=output, settings=settings)
        return job

    def cancel(self, job_id: str | None = None) -> None:
        if self.running:
            try:
                self.send("cancel", job=job_id)
            except EngineDied:
                pass

    def shutdown(self, timeout: float = 10.0) -> None:
        if self.process is None:
            return
        if self.running:
            try:
                self.send("shutdown")
                self.process.stdin.close()
            except (EngineDied, OSError, ValueError):
                pass
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        for thread in self._threads:
            thread.join(timeout=2.0)

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)


@dataclasses.dataclass
class Job:
    """Client-side state of one generate request, updated from the event stream."""

    id: str
    image: str
    output: str
    settings: dict
    state: str = "running"  # running | done | failed | cancelled
    stage: str = ""
    step: int = 0
    total: int = 0
    eta_s: float | None = None
    result: dict | None = None
    error: str = ""
    error_code: str = ""

    @property
    def finished(self) -> bool:
        return self.state != "running"

    @property
    def fraction(self) -> float:
        return self.step / self.total if self.total else 0.0

    def status_text(self) -> str:
        if self.state == "running":
            if not self.stage:
                return "Starting the engine"
            text = f"{stage_label(self.stage)}: step {self.step}/{self.total}"
            if self.eta_s is not None:
                text += f", about {format_seconds(self.eta_s)} left in this stage"
            return text
        if self.state == "done":
            return "Done"
        if self.state == "cancelled":
            return "Cancelled"
        return f"Failed: {self.error}"

    def apply(self, event: dict, client: EngineClient | None = None) -> bool:
        """Update from one event; returns True if the event concerned this job."""
        kind = event.get("event")
        if kind == ENGINE_EXIT_EVENT:
            if not self.finished:
                self.state = "failed"
                self.error_code = "engine_died"
                self.error = client.death_message() if client is not None else \
                    f"The engine stopped unexpectedly (exit code {event.get('returncode')})."
            return True
        if event.get("id") != self.id or self.finished:
            return False
        if kind == "progress":
            self.stage = str(event.get("stage", ""))
            self.step = int(event.get("step", 0))
            self.total = int(event.get("total", 0))
            self.eta_s = event.get("eta_s")
        elif kind == "result":
            self.state = "done"
            self.result = event
        elif kind == "error":
            self.state = "failed"
            self.error_code = str(event.get("code", ""))
            self.error = str(event.get("message", "unknown error"))
        elif kind == "cancelled":
            self.state = "cancelled"
        return True

    def apply_all(self, events: Iterable[dict], client: EngineClient | None = None) -> None:
        for event in events:
            self.apply(event, client)


STAGE_LABELS = {
    "load": "Loading models",
    "preprocess": "Preparing the image",
    "condition": "Reading the image",
    "dense": "Coarse shape",
    "sparse_512": "Detail (512)",
    "refine_512": "Surface (512)",
    "sparse_1024": "Detail (1024)",
    "refine_1024": "Surface (1024)",
    "postprocess": "Cleaning the mesh",
}


def stage_label(stage: str) -> str:
    return STAGE_LABELS.get(stage, stage.replace("_", " ").capitalize())


def format_seconds(seconds: float) -> str:
    seconds = max(0.0, float(seconds))
    if seconds < 60:
        return f"{seconds:.0f} s"
    minutes, rest = divmod(int(round(seconds)), 60)
    return f"{minutes} min {rest:02d} s"


def run_job(client: EngineClient, image: str, output: str, settings: dict,
            on_progress: Callable[[Job], None] | None = None,
            should_cancel: Callable[[], bool] | None = None,
            timeout: float | None = None) -> Job:
    """Blocking helper (background mode, scripts): run one job to its end."""
    client.wait_ready()
    job = client.start_job(image, output, settings)
    deadline = None if timeout is None else time.monotonic() + timeout
    cancel_sent = False
    while not job.finished:
        if should_cancel is not None and not cancel_sent and should_cancel():
            client.cancel(job.id)
            cancel_sent = True
        if deadline is not None and time.monotonic() > deadline and not cancel_sent:
            client.cancel(job.id)
            cancel_sent = True
        event = client.next_event(0.2)
        if event is None:
            continue
        before = (job.stage, job.step)
        job.apply(event, client)
        if on_progress is not None and event.get("event") == "progress" and (job.stage, job.step) != before:
            on_progress(job)
    return job
