"""The one engine process of this Blender session and the job it runs.

Plain Python state shared by the operators; it lives for the whole Blender session, while
``bpy.data`` references would be invalidated by undo and file loads, so only names, paths and
plain values are stored here.
"""

from __future__ import annotations

import dataclasses

from .engine_client import EngineClient, EngineConfig, EngineError, Job


@dataclasses.dataclass
class PendingImport:
    """Everything needed to import a job's result once it arrives (or to import it again)."""

    image_path: str
    object_name: str
    import_options: dict
    fit_bounds: tuple | None  # (min_xyz, max_xyz) world bounding box captured at submission
    result: dict | None = None


class EngineSession:
    def __init__(self):
        self.client: EngineClient | None = None
        self.job: Job | None = None
        self.pending: PendingImport | None = None
        self.last_import: PendingImport | None = None
        self.cancel_requested = False  # set by the cancel operator, read by the modal

    @property
    def busy(self) -> bool:
        return self.job is not None and not self.job.finished

    def ensure_client(self, config: EngineConfig) -> EngineClient:
        """Return a running engine with this configuration, starting or restarting it."""
        if self.client is not None and self.client.running and self.client.config == config:
            return self.client
        if self.busy:
            raise EngineError("The engine settings changed while a generation is running; "
                              "wait for it or cancel it, then try again")
        self.stop()
        client = EngineClient(config)
        client.start()
        self.client = client
        return client

    def stop(self) -> None:
        if self.client is not None:
            if self.busy:
                self.client.cancel(self.job.id)
            self.client.shutdown(timeout=10.0)
        self.client = None
        self.job = None
        self.pending = None


session = EngineSession()
