"""Long-lived engine process behind the Blender extension.

Started as ``python -m engine worker [--weights DIR] [--device cuda] [--dtype float16]
[--memory-mode resident]``. It speaks JSON lines: one request per line on stdin, one event
per line on stdout. Everything else (logs, stray prints from libraries, C-level writes to
file descriptor 1) goes to stderr, so the protocol stream stays clean. Meshes travel through
files, never through the pipe. The full protocol is described in ``docs/protocol.md``.

The pipeline is built on the first ``generate`` and kept until ``release`` or ``shutdown``.
Jobs run on a separate thread so the stdin loop keeps reading: a ``cancel`` request sets a
flag that the pipeline polls between sampler steps (its ``should_cancel`` callback).

Test seam: the environment variable ``D3D_WORKER_PIPELINE=module:factory`` replaces
``Direct3DS2Pipeline.from_pretrained`` by ``factory(weights_dir, device=, dtype=,
memory_mode=)``; ``module`` may also be the path of a ``.py`` file. Settings and the cancel
exception are always ``engine.pipeline``'s.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import importlib.util
import inspect
import json
import logging
import os
import platform
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any, Callable

PROTOCOL_VERSION = 1
PIPELINE_SEAM_ENV = "D3D_WORKER_PIPELINE"
MESH_SUFFIXES = (".glb", ".obj", ".ply", ".stl", ".npz")
# Checkpoint files of one official release folder (see the architecture notes).
OFFICIAL_WEIGHT_FILES = (
    "config.yaml",
    "model_dense.ckpt",
    "model_sparse_512.ckpt",
    "model_sparse_1024.ckpt",
    "model_refiner.ckpt",
    "model_refiner_1024.ckpt",
)

log = logging.getLogger("engine.worker")


class RequestError(Exception):
    """A request the worker rejects; ``code`` goes into the error event."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


# --------------------------------------------------------------------------------------
# Event output
# --------------------------------------------------------------------------------------


class EventWriter:
    """Writes one JSON object per line to the protocol stream, from any thread."""

    def __init__(self, stream):
        self._stream = stream
        self._lock = threading.Lock()

    def emit(self, event: str, **fields: Any) -> None:
        message = {"event": event}
        message.update(fields)
        line = json.dumps(message, default=_json_fallback, allow_nan=False)
        with self._lock:
            try:
                self._stream.write(line + "\n")
                self._stream.flush()
            except (BrokenPipeError, ValueError, OSError):
                # The client is gone; nothing left to tell it.
                pass


def _json_fallback(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    return str(value)


def take_over_stdout():
    """Keep a private handle on the real stdout and send everything else to stderr."""
    sys.stdout.flush()
    protocol_fd = os.dup(1)
    os.dup2(2, 1)  # C extensions writing to fd 1 now land in stderr
    sys.stdout = sys.stderr
    return os.fdopen(protocol_fd, "w", encoding="utf-8", newline="\n")


# --------------------------------------------------------------------------------------
# Pipeline API (real or injected)
# --------------------------------------------------------------------------------------


@dataclasses.dataclass
class PipelineApi:
    factory: Callable[..., Any]
    settings_class: type
    cancelled_error: type


def load_pipeline_api() -> PipelineApi:
    seam = os.environ.get(PIPELINE_SEAM_ENV, "").strip()
    if seam:
        module_name, _, factory_name = seam.rpartition(":")
        if not module_name or not factory_name:
            raise RequestError(
                "bad_configuration",
                f"{PIPELINE_SEAM_ENV} must look like 'package.module:factory', got {seam!r}",
            )
        if module_name.endswith(".py"):
            spec = importlib.util.spec_from_file_location("d3d_worker_seam", module_name)
            if spec is None or spec.loader is None:
                raise RequestError("bad_configuration", f"cannot load {module_name}")
            module = importlib.util.module_from_spec(spec)
            sys.modules[spec.name] = module  # dataclasses look their module up there
            spec.loader.exec_module(module)
        else:
            module = importlib.import_module(module_name)
        factory = getattr(module, factory_name)
    from engine import pipeline as real

    return PipelineApi(
        factory if seam else real.Direct3DS2Pipeline.from_pretrained,
        real.GenerationSettings, real.GenerationCancelled,
    )


def settings_from_request(settings_class: type, raw: Any):
    """Build the pipeline's settings dataclass from a request's ``settings`` object."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise RequestError("bad_request", "'settings' must be a JSON object")
    fields = {f.name: f for f in dataclasses.fields(settings_class)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise RequestError(
            "bad_request",
            f"unknown setting(s) {', '.join(unknown)}; known settings: {', '.join(sorted(fields))}",
        )
    values = {}
    for name, value in raw.items():
        field = fields[name]
        default = field.default if field.default is not dataclasses.MISSING else None
        values[name] = _check_setting(name, value, default)
    try:
        settings = settings_class(**values)
    except (TypeError, ValueError) as exc:
        raise RequestError("bad_request", f"invalid settings: {exc}") from exc
    resolution = getattr(settings, "resolution", None)
    if resolution is not None and resolution not in (512, 1024):
        raise RequestError("bad_request", f"resolution must be 512 or 1024, got {resolution}")
    for name in ("target_faces", "keep_largest_components"):
        count = getattr(settings, name, None)
        if count is not None and count < 1:
            raise RequestError("bad_request", f"{name} must be at least 1 (or null), got {count}")
    for name, value in dataclasses.asdict(settings).items():
        if name.endswith("_steps") and isinstance(value, int) and value < 1:
            raise RequestError("bad_request", f"{name} must be at least 1, got {value}")
    return settings


def _check_setting(name: str, value: Any, default: Any) -> Any:
    """Type-check one setting against the type of its default value."""
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise RequestError("bad_request", f"setting {name} must be true or false, got {value!r}")
        return value
    if isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, int):
            raise RequestError("bad_request", f"setting {name} must be an integer, got {value!r}")
        return value
    if isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise RequestError("bad_request", f"setting {name} must be a number, got {value!r}")
        return float(value)
    if default is None:  # optional counts such as target_faces
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int):
            raise RequestError(
                "bad_request", f"setting {name} must be an integer or null, got {value!r}"
            )
        return value
    return value


# --------------------------------------------------------------------------------------
# Environment report for the ready event
# --------------------------------------------------------------------------------------


def describe_torch() -> dict:
    info: dict[str, Any] = {"torch": None, "cuda_available": False, "cuda_version": None, "gpus": []}
    try:
        import torch
    except Exception as exc:  # noqa: BLE001 - any import failure is reported to the user
        info["torch_error"] = f"{type(exc).__name__}: {exc}"
        return info
    info["torch"] = torch.__version__
    info["cuda_version"] = torch.version.cuda
    try:
        available = torch.cuda.is_available()
    except Exception as exc:  # noqa: BLE001
        info["cuda_error"] = f"{type(exc).__name__}: {exc}"
        available = False
    info["cuda_available"] = bool(available)
    if available:
        for index in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(index)
            info["gpus"].append(
                {
                    "index": index,
                    "name": props.name,
                    "memory_gb": round(props.total_memory / 2**30, 2),
                    "capability": f"{props.major}.{props.minor}",
                }
            )
    return info


def check_weights(weights_dir: str | None, allow_download: bool = False) -> dict:
    """Report whether the weights are complete, without touching the network.

    With a folder: every official checkpoint file must be there, plus the DINOv2 image encoder
    (in the folder or the Hugging Face cache). Without a folder: the release is looked up in the
    Hugging Face cache, where a download would put it.
    """
    report: dict[str, Any] = {"dir": weights_dir, "complete": False, "missing": [], "version": None,
                              "download_allowed": bool(allow_download)}
    if weights_dir and not Path(weights_dir).is_dir():
        report["missing"] = list(OFFICIAL_WEIGHT_FILES)
        report["message"] = f"weights folder does not exist: {weights_dir}"
        return report
    try:
        from engine import weights as engine_weights
    except Exception as exc:  # noqa: BLE001 - reported, the worker still answers
        report["message"] = f"the engine's weights module could not be imported: {exc}"
        return report
    if weights_dir:
        report["missing"] = engine_weights.missing_files(weights_dir)
    try:
        location = engine_weights.resolve_weights(weights_dir or None, offline=True, download=False)
    except Exception as exc:  # noqa: BLE001 - WeightsError and friends carry the explanation
        report["message"] = str(exc)
        if allow_download and not weights_dir:
            report["message"] += " (they will be downloaded on the first generation)"
        return report
    report["complete"] = True
    report["dir"] = str(location.folder)
    version = location.version
    if version is None:  # a folder given by path: the official subfolder name tells the release
        for release, subfolder in getattr(engine_weights, "SUBFOLDERS", {}).items():
            if Path(location.folder).name == subfolder:
                version = release
    report["version"] = version
    report["image_encoder"] = str(location.image_encoder) if location.image_encoder else None
    return report


# --------------------------------------------------------------------------------------
# Jobs
# --------------------------------------------------------------------------------------


@dataclasses.dataclass
class Job:
    id: Any
    image: str
    output: Path
    settings: Any
    settings_raw: dict
    cancel_requested: threading.Event = dataclasses.field(default_factory=threading.Event)
    thread: threading.Thread | None = None


def describe_failure(exc: BaseException) -> tuple[str, str]:
    """Turn an exception from a job into (code, message a user can act on)."""
    text = str(exc) or type(exc).__name__
    name = type(exc).__name__
    if name == "OutOfMemoryError" or "out of memory" in text.lower():
        return (
            "out_of_memory",
            "The GPU ran out of memory. Try memory mode 'sequential', resolution 512, or close "
            "other programs that use the GPU, then generate again.",
        )
    lowered = text.lower()
    if "cuda is not available" in lowered or "found no nvidia driver" in lowered:
        return (
            "no_gpu",
            "The engine's torch cannot use a GPU (no CUDA build, or no driver/GPU visible). "
            "Install a CUDA build of torch into the engine's environment, or set Device to cpu "
            "(very slow).",
        )
    if "no kernel image is available" in lowered:
        return (
            "gpu_unsupported",
            "The engine's torch build does not support this GPU (common with RTX 50-series and "
            "torch built for CUDA older than 12.8). Install a torch build for a newer CUDA.",
        )
    if name == "WeightsError":
        return (
            "weights_missing",
            f"{text} Choose a complete weights folder in the add-on preferences, or allow the download.",
        )
    if name == "GenerationError":
        return "generation_failed", text
    if name == "ImageError":
        return "bad_image", f"The image cannot be used: {text}"
    if isinstance(exc, FileNotFoundError):
        return "file_not_found", f"A file is missing: {text}"
    if name == "UnidentifiedImageError":
        return "bad_image", f"The image could not be read: {text}"
    if isinstance(exc, ImportError):
        return (
            "engine_install",
            f"The engine's Python is missing a package ({text}). Install the engine's "
            "requirements into the interpreter chosen in the add-on preferences.",
        )
    if isinstance(exc, (ValueError, TypeError)):
        return "invalid_input", f"{text}"
    if isinstance(exc, MemoryError):
        return "out_of_memory", "The computer ran out of memory. Try resolution 512."
    return "job_failed", f"Generation failed: {name}: {text} (the engine log has the full traceback)"


def write_mesh_files(mesh, output: Path) -> dict:
    """Write the mesh to ``output`` plus a ``.npz`` twin (vertices float32, faces int32).

    Both are in the export frame of docs/output-frame.md (+Y up, +Z front). Each file is written
    under a temporary name and renamed, so a file that exists is complete.
    """
    import numpy as np

    try:
        from engine.mesh.frame import model_to_export
        from engine.mesh.postprocess import EXPORT_FORMATS, export_mesh
    except ImportError:  # the mesh package is optional for the fake pipeline seam
        model_to_export, export_mesh, EXPORT_FORMATS = None, None, {}
    vertices = np.asarray(mesh.vertices)
    if model_to_export is not None:
        vertices = model_to_export(vertices)
    vertices = np.ascontiguousarray(vertices, dtype=np.float32)
    faces = np.ascontiguousarray(np.asarray(mesh.faces), dtype=np.int32)
    output.parent.mkdir(parents=True, exist_ok=True)
    arrays_path = output.with_suffix(".npz")
    partial = arrays_path.with_name(arrays_path.stem + ".partial.npz")
    np.savez(partial, vertices=vertices, faces=faces)
    os.replace(partial, arrays_path)
    suffix = output.suffix.lower()
    if suffix != ".npz":
        if export_mesh is not None and suffix in EXPORT_FORMATS:
            export_mesh(mesh, output)
        else:
            partial_mesh = output.with_name(output.stem + ".partial" + output.suffix)
            mesh.export(str(partial_mesh))
            os.replace(partial_mesh, output)
    return {
        "mesh": str(output),
        "arrays": str(arrays_path),
        "vertices": int(vertices.shape[0]),
        "faces": int(faces.shape[0]),
    }


class Worker:
    def __init__(self, options: argparse.Namespace, events: EventWriter):
        self.options = options
        self.events = events
        self.pipeline = None
        self.api: PipelineApi | None = None
        self.job: Job | None = None
        self.job_lock = threading.Lock()
        self.pipeline_lock = threading.Lock()
        self.started = time.monotonic()
        self.jobs_done = 0
        self.stopping = False

    # ---- stdin loop ---------------------------------------------------------------

    def serve(self, stdin) -> None:
        self.events.emit("ready", **self.ready_fields())
        for raw in stdin:
            self.handle_line(raw)
            if self.stopping:
                break
        else:
            log.info("stdin closed; shutting down")
        self.shutdown()

    def ready_fields(self) -> dict:
        fields = {
            "protocol": PROTOCOL_VERSION,
            "pid": os.getpid(),
            "python": platform.python_version(),
            "device": self.options.device,
            "dtype": self.options.dtype,
            "memory_mode": self.options.memory_mode,
            "weights": check_weights(self.options.weights, self.options.allow_download),
        }
        fields.update(describe_torch())
        return fields

    def handle_line(self, raw: bytes | str) -> None:
        request_id = None
        try:
            if isinstance(raw, bytes):
                try:
                    raw = raw.decode("utf-8")
                except UnicodeDecodeError as exc:
                    raise RequestError("bad_request", "request is not valid UTF-8") from exc
            text = raw.strip()
            if not text:
                return
            try:
                request = json.loads(text)
            except json.JSONDecodeError as exc:
                raise RequestError("bad_request", f"request is not valid JSON: {exc.msg}") from exc
            if not isinstance(request, dict):
                raise RequestError("bad_request", "request must be a JSON object")
            request_id = request.get("id")
            command = request.get("cmd")
            handler = {
                "generate": self.on_generate,
                "cancel": self.on_cancel,
                "release": self.on_release,
                "status": self.on_status,
                "ping": self.on_status,
                "shutdown": self.on_shutdown,
            }.get(command)
            if handler is None:
                raise RequestError(
                    "unknown_command",
                    f"unknown cmd {command!r}; expected one of generate, cancel, release, "
                    "status, ping, shutdown",
                )
            handler(request_id, request)
        except RequestError as exc:
            self.events.emit("error", id=request_id, code=exc.code, message=exc.message)
        except Exception as exc:  # noqa: BLE001 - the loop must survive anything
            log.error("request handling failed:\n%s", traceback.format_exc())
            code, message = describe_failure(exc)
            self.events.emit("error", id=request_id, code=code, message=message)

    # ---- commands ------------------------------------------------------------------

    def on_generate(self, request_id, request: dict) -> None:
        if request_id is None:
            raise RequestError("bad_request", "generate needs an 'id' so its events can be matched")
        image = request.get("image")
        if not isinstance(image, str) or not image:
            raise RequestError("bad_request", "generate needs 'image': a path to an image file")
        if not Path(image).is_file():
            raise RequestError("file_not_found", f"image file not found: {image}")
        output = request.get("output")
        if not isinstance(output, str) or not output:
            raise RequestError("bad_request", "generate needs 'output': the path of the mesh to write")
        output_path = Path(output)
        if not output_path.is_absolute():
            raise RequestError("bad_request", f"'output' must be an absolute path, got {output}")
        if output_path.suffix.lower() not in MESH_SUFFIXES:
            raise RequestError(
                "bad_request",
                f"'output' must end in one of {', '.join(MESH_SUFFIXES)}, got {output_path.name}",
            )
        raw_settings = request.get("settings") or {}
        api = self.ensure_api()
        settings = settings_from_request(api.settings_class, raw_settings)
        with self.job_lock:
            if self.job is not None:
                raise RequestError(
                    "busy", f"the engine is busy with job {self.job.id!r}; cancel it or wait"
                )
            job = Job(request_id, image, output_path, settings, dict(raw_settings))
            job.thread = threading.Thread(target=self.run_job, args=(job,), name=f"job-{request_id}")
            job.thread.daemon = True
            self.job = job
        job.thread.start()

    def on_cancel(self, request_id, request: dict) -> None:
        target = request.get("job")
        with self.job_lock:
            job = self.job
            matches = job is not None and (target is None or target == job.id)
            if matches:
                job.cancel_requested.set()
        self.events.emit(
            "ack",
            id=request_id,
            cmd="cancel",
            job=job.id if matches else target,
            cancelling=bool(matches),
        )

    def on_release(self, request_id, request: dict) -> None:
        with self.job_lock:
            if self.job is not None:
                raise RequestError("busy", "cannot release models while a job runs; cancel it first")
            self.release_pipeline()
        self.events.emit("ack", id=request_id, cmd="release")

    def on_status(self, request_id, request: dict) -> None:
        with self.job_lock:
            job_id = self.job.id if self.job is not None else None
        self.events.emit(
            "status",
            id=request_id,
            busy=job_id is not None,
            job=job_id,
            pipeline_loaded=self.pipeline is not None,
            jobs_done=self.jobs_done,
            uptime_s=round(time.monotonic() - self.started, 3),
        )

    def on_shutdown(self, request_id, request: dict) -> None:
        self.stopping = True
        self.events.emit("ack", id=request_id, cmd="shutdown")

    # ---- job thread ----------------------------------------------------------------

    def ensure_api(self) -> PipelineApi:
        if self.api is None:
            try:
                self.api = load_pipeline_api()
            except RequestError:
                raise
            except Exception as exc:  # noqa: BLE001
                log.error("could not import the pipeline:\n%s", traceback.format_exc())
                code, message = describe_failure(exc)
                if code == "job_failed":
                    message = f"The engine could not load its pipeline code: {type(exc).__name__}: {exc}"
                raise RequestError("engine_install" if code == "job_failed" else code, message) from exc
        return self.api

    def get_pipeline(self):
        with self.pipeline_lock:
            if self.pipeline is None:
                api = self.ensure_api()
                weights = self.options.weights
                if weights and not Path(weights).is_dir():
                    raise RequestError(
                        "weights_missing",
                        f"The weights folder {weights} does not exist. Choose the folder holding "
                        "the Direct3D-S2 checkpoints in the add-on preferences.",
                    )
                started = time.monotonic()
                log.info("building the pipeline from %s on %s", weights, self.options.device)
                keyword_arguments = {
                    "device": self.options.device,
                    "dtype": resolve_dtype(self.options.dtype),
                    "memory_mode": self.options.memory_mode,
                }
                if "offline" in _parameters(api.factory):
                    keyword_arguments["offline"] = not self.options.allow_download
                self.pipeline = api.factory(weights or None, **keyword_arguments)
                log.info("pipeline ready in %.1f s", time.monotonic() - started)
            return self.pipeline

    def release_pipeline(self) -> None:
        with self.pipeline_lock:
            pipeline, self.pipeline = self.pipeline, None
        if pipeline is not None:
            release = getattr(pipeline, "release", None)
            if callable(release):
                release()
            del pipeline
            try:
                import gc

                gc.collect()
                import torch

                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
            except Exception:  # noqa: BLE001 - releasing is best effort
                pass

    def run_job(self, job: Job) -> None:
        started = time.monotonic()
        try:
            final = self.execute_job(job, started)
        except BaseException as exc:  # noqa: BLE001 - every outcome must reach the client
            if self.api is not None and isinstance(exc, self.api.cancelled_error):
                log.info("job %r cancelled after %.2f s", job.id, time.monotonic() - started)
                final = {"event": "cancelled", "id": job.id}
            elif isinstance(exc, RequestError):
                final = {"event": "error", "id": job.id, "code": exc.code, "message": exc.message}
            else:
                log.error("job %r failed:\n%s", job.id, traceback.format_exc())
                code, message = describe_failure(exc)
                if code == "out_of_memory":
                    self.release_pipeline()
                final = {"event": "error", "id": job.id, "code": code, "message": message}
        # Free the slot before the final event so a client may submit again at once.
        with self.job_lock:
            if self.job is job:
                self.job = None
        self.events.emit(**final)

    def execute_job(self, job: Job, started: float) -> dict:
        if job.cancel_requested.is_set():
            raise self.api.cancelled_error("cancelled before start")
        was_loaded = self.pipeline is not None
        if not was_loaded:
            self.events.emit("progress", id=job.id, stage="load", step=0, total=1, eta_s=None,
                             elapsed_s=0.0)
        pipeline = self.get_pipeline()
        if not was_loaded:
            self.events.emit("progress", id=job.id, stage="load", step=1, total=1, eta_s=0.0,
                             elapsed_s=round(time.monotonic() - started, 3))
        if job.cancel_requested.is_set():
            raise self.api.cancelled_error("cancelled after loading")

        def on_progress(progress) -> None:
            self.events.emit(
                "progress",
                id=job.id,
                stage=progress.stage,
                step=int(progress.step),
                total=int(progress.total),
                eta_s=None if progress.eta_s is None else round(float(progress.eta_s), 2),
                elapsed_s=round(float(progress.elapsed_s), 3),
            )

        result = pipeline.generate(
            job.image,
            job.settings,
            on_progress=on_progress,
            should_cancel=job.cancel_requested.is_set,
        )
        if job.cancel_requested.is_set():
            raise self.api.cancelled_error("cancelled after generation")
        files = write_mesh_files(result.mesh, job.output)
        stats = dict(getattr(result, "stats", {}) or {})
        stats["job_seconds"] = round(time.monotonic() - started, 3)
        self.jobs_done += 1
        return {
            "event": "result",
            "id": job.id,
            "mesh": files["mesh"],
            "arrays": files["arrays"],
            "vertices": files["vertices"],
            "faces": files["faces"],
            "stats": stats,
            "settings": dataclasses.asdict(job.settings),
        }

    def shutdown(self) -> None:
        with self.job_lock:
            job = self.job
            if job is not None:
                job.cancel_requested.set()
        if job is not None and job.thread is not None:
            job.thread.join(timeout=30)
            if job.thread.is_alive():
                # A stage that does not poll the cancel flag is still running; exiting the
                # interpreter under a busy torch thread aborts, so leave at once instead.
                log.warning("job %r did not stop within 30 s; exiting without waiting", job.id)
                logging.shutdown()
                sys.stderr.flush()
                os._exit(0)
        self.release_pipeline()
        log.info("worker stopped")


def _parameters(function) -> set:
    try:
        return set(inspect.signature(function).parameters)
    except (TypeError, ValueError):
        return set()


def resolve_dtype(name: str):
    import torch

    table = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
    return table[name]


def parse_arguments(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m engine worker",
        description="JSON-lines worker: reads requests on stdin, writes events on stdout.",
    )
    parser.add_argument("--weights", default=os.environ.get("D3D_WEIGHTS"),
                        help="folder with the Direct3D-S2 checkpoints (default: $D3D_WEIGHTS)")
    parser.add_argument("--device", default="cuda", help="torch device, e.g. cuda, cuda:1, cpu")
    parser.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    parser.add_argument("--memory-mode", default="resident", choices=["resident", "sequential"])
    parser.add_argument("--allow-download", action="store_true",
                        default=os.environ.get("D3D_ALLOW_DOWNLOAD") == "1",
                        help="download missing weights (default: offline; or $D3D_ALLOW_DOWNLOAD=1)")
    parser.add_argument("--log-level", default="INFO")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    if argv is None:
        argv = sys.argv[1:]
        if argv[:1] == ["worker"]:
            argv = argv[1:]
    options = parse_arguments(argv)
    logging.basicConfig(
        stream=sys.stderr,
        level=getattr(logging, str(options.log_level).upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    events = EventWriter(take_over_stdout())
    worker = Worker(options, events)
    try:
        worker.serve(sys.stdin.buffer)
    except KeyboardInterrupt:
        worker.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
