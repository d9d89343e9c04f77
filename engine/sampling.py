"""Rectified-flow sampler of Direct3D-S2 (architecture notes 2.8), kept apart from the pipeline.

It reproduces what the official pipeline gets from diffusers' ``FlowMatchEulerDiscreteScheduler
(num_train_timesteps=1000, shift=S)`` with ``set_timesteps(N)``:

* training sigmas ``s = t/1000`` for t = 1000..1 are shifted once, ``s' = S*s / (1 + (S-1)*s)``; that
  fixes ``sigma_max = 1`` and ``sigma_min = shift(0.001)``;
* inference sigmas are ``linspace(sigma_max, sigma_min, N)`` shifted once more, then a final 0;
* the timestep shown to the network is ``1000 * sigma``, rounded to fp16 (the official code builds
  ``torch.tensor([t], dtype=float16)``);
* Euler step ``x <- x + (sigma_next - sigma) * v`` with ``x`` in fp32, cast back to ``v``'s dtype;
* classifier-free guidance ``v = v_u + g * (v_c - v_u)`` whenever ``g > 0``.

Random numbers: one ``torch.Generator`` on the sampling device, seeded once per generation, draws the
initial noise of every stage in order (dense, sparse 512, sparse 1024) with
``torch.randn(shape, dtype=float16)``, as the official pipeline does with the generator it is given. The
noise is drawn in fp16 whatever the compute dtype and then cast, so a seed gives the same starting point
in fp16, bf16 and fp32 runs (the official code draws in the pipeline dtype, so only its fp16 runs share
our stream; fp16 is its default and only tested dtype). CPU and CUDA generators produce different streams for the same seed, so a
seed reproduces an official run only on the same device type; and the sparse stages' noise depends on the
token count, so it only matches when the earlier stages produced the same tokens.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Union

import numpy as np
import torch

NUM_TRAIN_TIMESTEPS = 1000


class GenerationCancelled(Exception):
    """Raised inside a sampling loop when the caller's cancel callback returns True."""


def shift_sigmas(sigmas, shift: float):
    """The time-shift map ``s -> shift*s / (1 + (shift-1)*s)``: spends more steps at high noise."""
    return shift * sigmas / (1 + (shift - 1) * sigmas)


@dataclass(frozen=True)
class FlowSchedule:
    """``timesteps[i]`` (float32, in [0, 1000]) and ``sigmas[i]`` for i < steps; ``sigmas[steps] == 0``."""
    timesteps: torch.Tensor
    sigmas: torch.Tensor
    shift: float

    @property
    def steps(self) -> int:
        return int(self.timesteps.numel())

    def model_timestep(self, index: int) -> torch.Tensor:
        """The timestep fed to the network at step ``index``: shape [1], fp16-rounded, stored as fp32."""
        return self.timesteps[index:index + 1].to(torch.float16).to(torch.float32)


def flow_match_schedule(steps: int, shift: float, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS) -> FlowSchedule:
    """The shifted rectified-flow schedule of ``steps`` Euler steps (same values as diffusers)."""
    if not isinstance(steps, (int, np.integer)) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    if not shift > 0:
        raise ValueError(f"shift must be positive, got {shift!r}")
    # Training sigmas, float32 like the scheduler constructor; only their ends are used.
    train_t = torch.from_numpy(np.linspace(1, num_train_timesteps, num_train_timesteps, dtype=np.float32)[::-1].copy())
    train_sigmas = shift_sigmas(train_t / num_train_timesteps, shift)
    sigma_max = train_sigmas[0].item()
    sigma_min = train_sigmas[-1].item()
    # set_timesteps works in float64 numpy, then converts to float32.
    sigmas = np.linspace(sigma_max * num_train_timesteps, sigma_min * num_train_timesteps, steps) / num_train_timesteps
    sigmas = torch.from_numpy(shift_sigmas(sigmas, shift)).to(torch.float32)
    timesteps = sigmas * num_train_timesteps
    sigmas = torch.cat([sigmas, torch.zeros(1, dtype=torch.float32)])
    return FlowSchedule(timesteps=timesteps, sigmas=sigmas, shift=float(shift))


def euler_step(latents: torch.Tensor, velocity: torch.Tensor, sigma: torch.Tensor, sigma_next: torch.Tensor) -> torch.Tensor:
    """One Euler step of the flow ODE. ``sigma``/``sigma_next`` are 0-dim float32 tensors; the
    product with ``velocity`` follows torch's promotion (it stays in ``velocity``'s dtype, as in
    diffusers), the sum is fp32, the result is cast to ``velocity``'s dtype."""
    updated = latents.to(torch.float32) + (sigma_next - sigma) * velocity
    return updated.to(velocity.dtype)


def classifier_free_guidance(v_cond: torch.Tensor, v_uncond: torch.Tensor, guidance: float) -> torch.Tensor:
    """``v_u + g*(v_c - v_u)``."""
    return v_uncond + guidance * (v_cond - v_uncond)


def make_generator(seed: int, device: Union[str, torch.device] = "cpu") -> torch.Generator:
    """A generator on ``device`` seeded with ``seed`` (shared by all stages of one generation)."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed < 2 ** 63:
        raise ValueError(f"seed must be an integer in [0, 2**63), got {seed!r}")
    device = torch.device(device)
    if device.type == "meta":
        device = torch.device("cpu")
    return torch.Generator(device=device).manual_seed(int(seed))


def initial_noise(shape: Sequence[int], generator: torch.Generator, dtype: torch.dtype = torch.float16) -> torch.Tensor:
    """Standard normal noise drawn in fp16 on the generator's device, then cast to ``dtype``."""
    noise = torch.randn(tuple(shape), dtype=torch.float16, generator=generator, device=generator.device)
    return noise.to(dtype)


# model_fn(x, t) -> velocity. ``x`` has a leading batch axis of 2 (conditional, unconditional) when
# guidance is on, else 1; ``t`` is the fp16-rounded timestep [1] (fp32 storage). The output has x's shape.
ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def sample(model_fn: ModelFn, noise: torch.Tensor, schedule: FlowSchedule, guidance: float,
           on_step: Optional[Callable[[int, int], None]] = None,
           should_cancel: Optional[Callable[[], bool]] = None) -> torch.Tensor:
    """Integrate the flow from ``noise`` (sigma = 1) to sigma = 0.

    With ``guidance > 0`` the conditional and unconditional velocities come from ONE call of
    ``model_fn`` on a batch of two copies of the latents (index 0 conditional, 1 unconditional).
    ``should_cancel`` is polled before every step (GenerationCancelled is raised);
    ``on_step(done, total)`` is called after every step.
    """
    guided = guidance > 0
    latents = noise
    total = schedule.steps
    # every step's network timestep moved to the device once (a per-step host->device copy would
    # synchronise with the queued work); the values are those of `schedule.model_timestep(i)`
    timesteps = schedule.timesteps.to(torch.float16).to(torch.float32).to(latents.device)
    for index in range(total):
        if should_cancel is not None and should_cancel():
            raise GenerationCancelled(f"cancelled before step {index + 1} of {total}")
        t = timesteps[index:index + 1]
        batch = latents.unsqueeze(0).expand(2 if guided else 1, *latents.shape)
        output = model_fn(batch, t)
        if output.shape != batch.shape:
            raise RuntimeError(f"model_fn returned shape {tuple(output.shape)}, expected {tuple(batch.shape)}")
        velocity = classifier_free_guidance(output[0], output[1], guidance) if guided else output[0]
        latents = euler_step(latents, velocity, schedule.sigmas[index], schedule.sigmas[index + 1])
        if on_step is not None:
            on_step(index + 1, total)
    return latents


# ------------------------------------------------------------------------------------------ CUDA graphs
def cuda_graphs_supported(*tensors: torch.Tensor) -> bool:
    """Whether a forward over these inputs may be captured: all on one CUDA device, no autograd."""
    if not tensors or not torch.cuda.is_available() or torch.is_grad_enabled():
        return False
    device = tensors[0].device
    return device.type == "cuda" and all(t.device == device for t in tensors)


class CUDAGraphRunner:
    """Replays a captured `fn(*inputs) -> Tensor` for inputs of fixed shapes (a sampler's network call).

    Calls 1 .. `warmup_calls` run `fn` eagerly (they fill the coordinate caches, autotune kernels and
    pick cuDNN algorithms; their outputs are the real results); the last of them runs under
    `torch.cuda.set_sync_debug_mode("error")`, so a forward that still reads device values on the
    host is detected before any capture is attempted. The next call captures `fn` on static copies of
    the inputs, and every call from then on copies its inputs into those buffers, replays the graph
    and returns a copy of the static output. Any failure (a host synchronisation, a capture error)
    turns the runner into a plain eager caller, with a warning. A new input signature (shapes, dtypes,
    device) starts over. Off (plain calls) on CPU, under autograd, or with `enabled=False`.

    `fn` must only depend on its tensor inputs and on state that stays fixed while the runner is used
    (parameters, cached coordinate bookkeeping): the graph replays the captured kernels on the same
    memory.
    """

    def __init__(self, fn: Callable[..., torch.Tensor], enabled: bool = True, warmup_calls: int = 2):
        self.fn = fn
        self.enabled = enabled
        self.warmup_calls = max(1, int(warmup_calls))
        self.failed: Optional[str] = None
        self._streams: dict = {}   # purpose -> side stream of this runner
        self._reset(None)

    def _reset(self, signature) -> None:
        self.signature = signature
        self.calls = 0
        self.graph = None
        self.static_inputs: list[torch.Tensor] = []
        self.static_output: Optional[torch.Tensor] = None

    @property
    def captured(self) -> bool:
        return self.graph is not None

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        if not self.enabled or self.failed is not None or not cuda_graphs_supported(*inputs):
            return self.fn(*inputs)
        signature = tuple((tuple(t.shape), t.dtype, t.device) for t in inputs)
        if signature != self.signature:
            self._reset(signature)
        if self.graph is not None:
            return self._replay(inputs)
        self.calls += 1
        if self.calls < self.warmup_calls:
            return self.fn(*inputs)
        if self.calls == self.warmup_calls:
            return self._checked_call(inputs)
        if self._capture(inputs):
            return self._replay(inputs)
        return self.fn(*inputs)

    def _disable(self, reason: str) -> None:
        self.failed = reason
        self.graph, self.static_inputs, self.static_output = None, [], None
        warnings.warn(f"CUDA graphs disabled for this sampler: {reason}", RuntimeWarning, stacklevel=3)

    def _side_stream(self, device: torch.device, purpose: str = "checked"):
        """A stream of this runner's own for the checked call or for the capture (two, so that a
        capture never begins on a stream with queued work)."""
        stream = self._streams.get(purpose)
        if stream is None or stream.device != device:
            stream = self._streams[purpose] = torch.cuda.Stream(device)
        return stream

    def _checked_call(self, inputs) -> torch.Tensor:
        """An eager call on the capture stream (as the capture will run) with host syncs as errors."""
        device = inputs[0].device
        main, side = torch.cuda.current_stream(device), self._side_stream(device)
        side.wait_stream(main)
        previous = torch.cuda.get_sync_debug_mode()
        try:
            with torch.cuda.stream(side):
                torch.cuda.set_sync_debug_mode("error")
                output = self.fn(*inputs)
        except RuntimeError as error:
            if "synchroniz" not in str(error).lower():
                raise
            torch.cuda.set_sync_debug_mode(previous)
            main.wait_stream(side)
            self._disable(f"the forward synchronises with the host ({error})")
            return self.fn(*inputs)
        finally:
            torch.cuda.set_sync_debug_mode(previous)
        main.wait_stream(side)
        if isinstance(output, torch.Tensor):
            output.record_stream(main)
        return output

    def _capture(self, inputs) -> bool:
        device = inputs[0].device
        self.static_inputs = [t.detach().clone() for t in inputs]
        graph = torch.cuda.CUDAGraph()
        try:
            # capture_begin/end directly rather than `torch.cuda.graph`, whose synchronize(),
            # gc.collect() and empty_cache() would cost every stage of every generation tens of
            # milliseconds. No synchronisation either: capturing only records kernels, so the host
            # builds the graph while the GPU still runs the previous (checked) step, and the replay
            # is queued behind it on the caller's stream.
            with torch.cuda.stream(self._side_stream(device, "capture")):
                graph.capture_begin()
                try:
                    output = self.fn(*self.static_inputs)
                finally:
                    graph.capture_end()
            if not isinstance(output, torch.Tensor):
                raise TypeError(f"captured function returned {type(output).__name__}, not a Tensor")
        except Exception as error:  # noqa: BLE001 - any capture problem means eager execution
            try:
                torch.cuda.synchronize(device)
            except Exception:  # noqa: BLE001
                pass
            self._disable(f"capture failed ({type(error).__name__}: {error})")
            return False
        self.graph, self.static_output = graph, output
        return True

    def _replay(self, inputs) -> torch.Tensor:
        for static, value in zip(self.static_inputs, inputs):
            if static.data_ptr() != value.data_ptr():
                static.copy_(value)
        self.graph.replay()
        return self.static_output.clone()
