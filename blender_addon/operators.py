"""Operators: generate (modal in the UI, blocking in background mode), cancel, import the last
result again, restart and check the engine."""

from __future__ import annotations

import time
from pathlib import Path

import bpy

from . import mesh_import
from .engine_client import EngineError, Job, format_seconds, run_job
from .preferences import engine_config, get_preferences, user_folder
from .session import PendingImport, session

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tga", ".tif", ".tiff"}
CANCEL_GRACE_SECONDS = 20.0
KEEP_RESULTS = 20  # newest results kept in the extension's results folder
UNDO_MESSAGE = "Generate 3D from Image"


# --------------------------------------------------------------------------------------
# Request preparation (main thread, before the job starts)
# --------------------------------------------------------------------------------------


class RequestProblem(Exception):
    """A setting that stops the job before it starts; the message is meant for the user."""


def resolve_image(settings) -> tuple[str, str]:
    """Return (path of an image file the engine can read, display name for the object)."""
    if settings.image_source == "FILE":
        if not settings.image_path:
            raise RequestProblem("Choose a reference image first")
        path = Path(bpy.path.abspath(settings.image_path))
        if not path.is_file():
            raise RequestProblem(f"The image file does not exist: {path}")
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            raise RequestProblem(f"{path.name} is not a supported image "
                                 f"({', '.join(sorted(IMAGE_SUFFIXES))})")
        return str(path), path.stem
    image = settings.image
    if image is None:
        raise RequestProblem("Pick an image from the blend file first")
    name = Path(image.name).stem or "image"
    on_disk = Path(bpy.path.abspath(image.filepath)) if image.filepath else None
    if (image.source == "FILE" and image.packed_file is None and not image.is_dirty
            and on_disk is not None and on_disk.is_file()
            and on_disk.suffix.lower() in IMAGE_SUFFIXES):
        return str(on_disk), name
    if image.size[0] == 0 or image.size[1] == 0:
        raise RequestProblem(f"The image '{image.name}' has no pixels")
    # Packed, generated or edited images: hand the engine a PNG copy.
    copy_path = user_folder("inputs") / f"{bpy.path.clean_name(name)}-{int(time.time() * 1000)}.png"
    save_params = bpy.types.Image.bl_rna.functions["save"].parameters.keys()
    if "save_copy" in save_params:
        image.save(filepath=str(copy_path), save_copy=True)
    else:
        duplicate = image.copy()
        try:
            duplicate.filepath_raw = str(copy_path)
            duplicate.file_format = "PNG"
            duplicate.save()
        finally:
            bpy.data.images.remove(duplicate)
    return str(copy_path), name


def selected_fit_bounds(context):
    candidates = [context.active_object] if context.active_object is not None else []
    candidates += list(context.selected_objects)
    for obj in candidates:
        if obj is not None and obj.select_get() and obj.type in {"MESH", "CURVE", "SURFACE", "META",
                                                                 "FONT", "EMPTY", "LATTICE", "ARMATURE",
                                                                 "GREASEPENCIL", "GPENCIL", "VOLUME",
                                                                 "POINTCLOUD", "CURVES"}:
            return mesh_import.world_bounds(obj)
    return None


def prune_results(folder: Path, keep: int = KEEP_RESULTS) -> None:
    """Delete all but the newest ``keep`` results (each is a .glb with its .npz twin)."""
    stems = {}
    for file in folder.iterdir():
        if file.is_file() and file.suffix in (".glb", ".npz"):
            stems.setdefault(file.stem, []).append(file)
    ordered = sorted(stems.values(), key=lambda files: max(f.stat().st_mtime for f in files), reverse=True)
    for files in ordered[keep:]:
        for file in files:
            try:
                file.unlink()
            except OSError:
                pass


def prepare_job(context) -> tuple[PendingImport, dict, str]:
    settings = context.scene.d3d_settings
    image_path, name = resolve_image(settings)
    options = settings.import_options()
    fit_bounds = None
    if options["placement"] == "FIT_SELECTED":
        fit_bounds = selected_fit_bounds(context)
        if fit_bounds is None:
            raise RequestProblem("'Fit Selected' placement needs a selected object to fit into")
    if options["remesh"] == "VOXEL" and options["voxel_size"] <= 0:
        raise RequestProblem("Voxel size must be greater than zero")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    results = user_folder("results")
    prune_results(results)
    millis = int(time.time() * 1000) % 1000
    output = results / f"{bpy.path.clean_name(name)}-{stamp}-{millis:03d}-seed{settings.seed}.glb"
    pending = PendingImport(image_path=image_path, object_name=name, import_options=options,
                            fit_bounds=fit_bounds)
    return pending, settings.engine_settings(), str(output)


def import_pending(context, pending: PendingImport):
    """Import a finished job's mesh; returns (object, warnings)."""
    result = pending.result or {}
    return mesh_import.import_result(
        context, result["arrays"], pending.object_name, pending.import_options,
        fit_bounds=pending.fit_bounds, source_image=pending.image_path,
        settings=result.get("settings") or {})


def _redraw(context) -> None:
    screen = context.screen
    if screen is None:
        return
    for area in screen.areas:
        if area.type in {"VIEW_3D", "PREFERENCES"}:
            area.tag_redraw()


def _set_status(context, text: str | None) -> None:
    workspace = getattr(context, "workspace", None)
    if workspace is not None:
        try:
            workspace.status_text_set(text)
        except (AttributeError, TypeError, RuntimeError):
            pass


def _stop_if_not_kept(context) -> None:
    prefs = get_preferences(context)
    if prefs is not None and not prefs.keep_engine_running:
        session.stop()


# --------------------------------------------------------------------------------------
# Operators
# --------------------------------------------------------------------------------------


class D3D_OT_generate(bpy.types.Operator):
    """Generate a mesh from the reference image with the Direct3D-S2 engine"""

    bl_idname = "d3d.generate"
    bl_label = "Generate 3D from Image"
    # No UNDO flag: the redo panel would re-run a minutes-long job. The import pushes its own step.
    bl_options = {"REGISTER"}

    _timer = None
    _cancel_sent_at = None

    @classmethod
    def poll(cls, context):
        if session.busy:
            cls.poll_message_set("A generation is already running")
            return False
        if context.mode != "OBJECT":
            cls.poll_message_set("Switch to Object Mode to generate")
            return False
        return True

    # ---- shared start/finish ---------------------------------------------------------

    def _start(self, context):
        pending, settings, output = prepare_job(context)
        client = session.ensure_client(engine_config(context))
        return pending, settings, output, client

    def _finish(self, context, job: Job, pending: PendingImport) -> set:
        state = context.window_manager.d3d_job
        state.running = False
        state.progress = 0.0
        session.job = None
        if job.state == "done":
            pending.result = job.result
            try:
                obj, warnings = import_pending(context, pending)
            except Exception as exc:  # noqa: BLE001 - any import failure leaves the scene unchanged
                message = str(exc) if isinstance(exc, mesh_import.ImportFailed) else \
                    f"Import failed: {type(exc).__name__}: {exc}"
                state.last_error = message
                state.status = message
                self.report({"ERROR"}, message)
                return {"CANCELLED"}
            session.last_import = pending
            state.last_object = obj.name
            state.last_error = ""
            faces = len(obj.data.polygons)
            seconds = (job.result or {}).get("stats", {}).get("job_seconds")
            state.status = f"Created {obj.name}: {faces:,} faces" + (
                f" in {format_seconds(seconds)}" if seconds else "")
            for warning in warnings:
                self.report({"WARNING"}, warning)
            self.report({"INFO"}, state.status)
            _stop_if_not_kept(context)
            return {"FINISHED"}
        if job.state == "cancelled":
            state.status = "Generation cancelled"
            self.report({"WARNING"}, "Generation cancelled")
            return {"CANCELLED"}
        state.last_error = job.error
        state.status = "Generation failed"
        self.report({"ERROR"}, job.error)
        return {"CANCELLED"}

    # ---- blocking path: scripts and background mode ---------------------------------

    def execute(self, context):
        state = context.window_manager.d3d_job
        try:
            pending, settings, output, client = self._start(context)
        except (RequestProblem, EngineError, mesh_import.ImportFailed) as exc:
            state.last_error = str(exc)
            self.report({"ERROR"}, str(exc))
            return {"CANCELLED"}
        state.running = True
        state.last_error = ""
        last_print = [0.0]

        def print_progress(job: Job) -> None:
            now = time.monotonic()
            if job.step in (0, job.total) or now - last_print[0] > 2.0:
                last_print[0] = now
                print(f"Direct3D-S2: {job.status_text()}", flush=True)

        print(f"Direct3D-S2: generating from {pending.image_path}", flush=True)
        try:
            job = run_job(client, pending.image_path, output, settings, on_progress=print_progress)
        except EngineError as exc:
            state.running = False
            state.last_error = str(exc)
            self.report({"ERROR"}, str(exc))
            return {"CANCELLED"}
        return self._finish(context, job, pending)

    # ---- modal path: the UI ------------------------------------------------------------

    def invoke(self, context, event):
        if bpy.app.background:
            return self.execute(context)
        if not self._begin_job(context):
            return {"CANCELLED"}
        wm = context.window_manager
        self._timer = wm.event_timer_add(0.2, window=context.window)
        wm.modal_handler_add(self)
        return {"RUNNING_MODAL"}

    def _begin_job(self, context) -> bool:
        """Send the job to the engine without waiting (the modal path); False on a problem."""
        state = context.window_manager.d3d_job
        try:
            pending, settings, output, client = self._start(context)
            job = client.start_job(pending.image_path, output, settings)
        except (RequestProblem, EngineError, mesh_import.ImportFailed) as exc:
            state.last_error = str(exc)
            self.report({"ERROR"}, str(exc))
            return False
        session.job = job
        session.pending = pending
        session.cancel_requested = False
        self._cancel_sent_at = None
        state.running = True
        state.progress = 0.0
        state.last_error = ""
        state.status = "Starting the engine"
        _set_status(context, "Direct3D-S2: starting (Esc cancels)")
        return True

    def modal(self, context, event):
        job = session.job
        if job is None:  # stopped from elsewhere (restart engine)
            self._cleanup(context)
            return {"CANCELLED"}
        if event.type == "ESC" and event.value == "PRESS" and self._cancel_sent_at is None:
            self._request_cancel(context)
            return {"RUNNING_MODAL"}
        if event.type != "TIMER":
            return {"PASS_THROUGH"}
        if session.cancel_requested and self._cancel_sent_at is None:
            self._request_cancel(context)
        client = session.client
        if client is not None:
            job.apply_all(client.drain(), client)
        state = context.window_manager.d3d_job
        if not job.finished:
            if self._cancel_sent_at is not None and \
                    time.monotonic() - self._cancel_sent_at > CANCEL_GRACE_SECONDS:
                # The engine did not stop in time: stop the process itself.
                if client is not None:
                    client.kill()
                job.state = "cancelled"
            else:
                state.progress = job.fraction
                state.status = job.status_text() if self._cancel_sent_at is None else "Cancelling…"
                _set_status(context, f"Direct3D-S2: {state.status} (Esc cancels)")
                _redraw(context)
                return {"PASS_THROUGH"}
        self._cleanup(context)
        if self._cancel_sent_at is not None and job.state == "done":
            job.state = "cancelled"  # finished just as the cancel went out: discard the result
        pending = session.pending
        session.pending = None
        outcome = self._finish(context, job, pending)
        if "FINISHED" in outcome:
            try:
                bpy.ops.ed.undo_push(message=UNDO_MESSAGE)
            except RuntimeError:
                pass
        _redraw(context)
        return outcome

    def _request_cancel(self, context) -> None:
        self._cancel_sent_at = time.monotonic()
        if session.client is not None and session.job is not None:
            session.client.cancel(session.job.id)
        context.window_manager.d3d_job.status = "Cancelling…"

    def cancel(self, context):
        # Blender tears the modal down (quit, file load): stop the job, keep nothing.
        if session.client is not None and session.job is not None and not session.job.finished:
            session.client.cancel(session.job.id)
        session.job = None
        session.pending = None
        self._cleanup(context)

    def _cleanup(self, context) -> None:
        session.cancel_requested = False
        if self._timer is not None:
            context.window_manager.event_timer_remove(self._timer)
            self._timer = None
        state = context.window_manager.d3d_job
        state.running = False
        _set_status(context, None)


class D3D_OT_cancel_generation(bpy.types.Operator):
    """Stop the running generation (the engine stops within one sampler step)"""

    bl_idname = "d3d.cancel_generation"
    bl_label = "Cancel 3D Generation"

    @classmethod
    def poll(cls, context):
        if not session.busy:
            cls.poll_message_set("No generation is running")
            return False
        return True

    def execute(self, context):
        session.cancel_requested = True
        if session.client is not None and session.job is not None:
            session.client.cancel(session.job.id)
        context.window_manager.d3d_job.status = "Cancelling…"
        return {"FINISHED"}


class D3D_OT_import_last_result(bpy.types.Operator):
    """Import the last generated mesh again, with the current placement, shading and remesh settings"""

    bl_idname = "d3d.import_last_result"
    bl_label = "Import Last 3D Result Again"
    bl_options = {"REGISTER", "UNDO"}

    @classmethod
    def poll(cls, context):
        if session.last_import is None or session.last_import.result is None:
            cls.poll_message_set("Nothing has been generated in this session yet")
            return False
        if context.mode != "OBJECT":
            cls.poll_message_set("Switch to Object Mode to import")
            return False
        return True

    def execute(self, context):
        previous = session.last_import
        settings = context.scene.d3d_settings
        options = settings.import_options()
        fit_bounds = previous.fit_bounds
        if options["placement"] == "FIT_SELECTED":
            fit_bounds = selected_fit_bounds(context) or previous.fit_bounds
            if fit_bounds is None:
                self.report({"ERROR"}, "'Fit Selected' placement needs a selected object")
                return {"CANCELLED"}
        again = PendingImport(previous.image_path, previous.object_name, options, fit_bounds,
                              previous.result)
        try:
            obj, warnings = import_pending(context, again)
        except Exception as exc:  # noqa: BLE001
            self.report({"ERROR"}, str(exc))
            return {"CANCELLED"}
        for warning in warnings:
            self.report({"WARNING"}, warning)
        context.window_manager.d3d_job.last_object = obj.name
        self.report({"INFO"}, f"Imported {obj.name}")
        return {"FINISHED"}


class D3D_OT_restart_engine(bpy.types.Operator):
    """Stop the engine process (freeing its GPU memory) and start it again with the current preferences"""

    bl_idname = "d3d.restart_engine"
    bl_label = "Restart 3D Engine"

    def execute(self, context):
        session.stop()
        state = context.window_manager.d3d_job
        state.running = False
        try:
            session.ensure_client(engine_config(context))
        except EngineError as exc:
            state.engine_report = str(exc)
            self.report({"ERROR"}, str(exc))
            return {"CANCELLED"}
        state.status = "Engine restarted"
        self.report({"INFO"}, "Engine restarted")
        return {"FINISHED"}


def describe_ready(ready: dict) -> str:
    """Readable lines from the worker's ready event."""
    lines = [f"Engine Python {ready.get('python', '?')}, device {ready.get('device')}, "
             f"{ready.get('dtype')}, memory mode {ready.get('memory_mode')}"]
    if ready.get("torch"):
        cuda = f"CUDA {ready.get('cuda_version')}" if ready.get("cuda_version") else "no CUDA build"
        lines.append(f"torch {ready['torch']} ({cuda}); GPU available: "
                     f"{'yes' if ready.get('cuda_available') else 'no'}")
    else:
        lines.append(f"torch could not be imported: {ready.get('torch_error', 'unknown error')}")
    for gpu in ready.get("gpus", []):
        lines.append(f"GPU {gpu['index']}: {gpu['name']}, {gpu['memory_gb']} GB, "
                     f"compute {gpu['capability']}")
    weights = ready.get("weights") or {}
    if weights.get("complete"):
        version = weights.get("version") or "unknown version"
        lines.append(f"Weights complete ({version}) in {weights.get('dir')}")
    else:
        missing = weights.get("missing") or []
        reason = weights.get("message") or (f"missing: {', '.join(missing)}" if missing else "incomplete")
        lines.append(f"Weights not ready: {reason}")
    return "\n".join(lines)


class D3D_OT_check_engine(bpy.types.Operator):
    """Start the engine and report its torch, CUDA, GPU and weights status"""

    bl_idname = "d3d.check_engine"
    bl_label = "Check 3D Engine"

    def execute(self, context):
        state = context.window_manager.d3d_job
        try:
            client = session.ensure_client(engine_config(context))
            ready = client.wait_ready(timeout=180.0)
        except EngineError as exc:
            state.engine_report = f"Engine check failed: {exc}"
            self.report({"ERROR"}, str(exc))
            return {"CANCELLED"}
        state.engine_report = describe_ready(ready)
        usable = bool(ready.get("torch")) and bool((ready.get("weights") or {}).get("complete"))
        if ready.get("device", "").startswith("cuda") and not ready.get("cuda_available"):
            usable = False
        for line in state.engine_report.splitlines():
            print(f"Direct3D-S2: {line}")
        self.report({"INFO"} if usable else {"WARNING"},
                    "Engine ready" if usable else "Engine started, but see the report in the preferences")
        return {"FINISHED"}


classes = (
    D3D_OT_generate,
    D3D_OT_cancel_generation,
    D3D_OT_import_last_result,
    D3D_OT_restart_engine,
    D3D_OT_check_engine,
)


def register():
    session.cancel_requested = False
    for cls in classes:
        bpy.utils.register_class(cls)


def unregister():
    session.stop()
    for cls in reversed(classes):
        bpy.utils.unregister_class(cls)
