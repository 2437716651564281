"""CUDA graphs of the denoiser step: captured once per static shape, replayed at later steps.

At small batches a MegaSR step is bound by launching its kernels, not by running them: the
UNet, the ControlNet and their 23 CSMs and MSFMs issue well over a thousand kernels per step
from Python. A captured CUDA graph replays all of them with one launch.

A graph reads its inputs from the addresses it was captured with, so every input lives in a
static buffer that each call refills: the latents, the timestep, the text tokens and the
ControlNet condition at every step; once per run (when the conditioning object changes) the
CLIP image tokens, each CSM's visual keys/values and each MSFM's (γ, β). The run's first step
therefore runs eagerly: it computes those keys/values and modulations (the denoiser caches them
for the rest of the run) and the graph then reads copies of them.

:meth:`DenoiserGraphs.step` captures a whole sampling step in one graph: the CFG halves of the
batch, the denoiser, the CFG arithmetic and the sampler's update (``StepUpdate``: DDPM's, from a
row of coefficients and the step's noise, both copied into static buffers before each replay),
so a step is one launch plus a few copies. Tiled runs keep the update eager around the graphed
denoiser (:meth:`DenoiserGraphs.__call__`), as do samplers other than DDPM.

Graphs are kept per shape (batch, latent size, conditioning layout, ``conditioning_scale``) up
to ``max_graphs``, least recently used first out, and share one memory pool (they never run at
the same time, and each output is copied out at once). On a CPU (or with ``capture=False``) the
same static-buffer path runs eagerly, which is how the tests check its bookkeeping.
"""

from __future__ import annotations

import logging
import weakref
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from ..models import MegaSRDenoiser
from ..models.conditioning import MegaSRConditioning
from ..models.csm import CSM_ATTR
from ..models.msfm import MSFM
from .sampling import classifier_free_guidance, guidance_batch

log = logging.getLogger(__name__)

#: eager runs on a side stream before capture (cuBLAS/cuDNN workspaces, lazy initialisation)
WARMUP_RUNS = 2


@dataclass
class StepUpdate:
    """The rest of a sampling step after the denoiser, for :meth:`DenoiserGraphs.step`."""

    guidance_scale: float | None  # None: no CFG at this step (the batch is the positive half alone)
    update: Callable[[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor], torch.Tensor]
    key: tuple  # what distinguishes ``update``'s maths (``DeviceDDPM.update_key``)
    coefficients: torch.Tensor  # this step's row (copied into the graph's static buffer)
    noise: torch.Tensor | None  # this step's noise, or None for a step without


@dataclass
class _Graph:
    """One captured shape: its static inputs, its static output and what last filled them."""

    latents: torch.Tensor
    timestep: torch.Tensor
    text: torch.Tensor
    control: torch.Tensor
    conditioning: MegaSRConditioning
    kv: list[tuple[Any, torch.Tensor, torch.Tensor]] = field(default_factory=list)  # (CSM, key, value)
    output: torch.Tensor | None = None
    graph: Any = None  # torch.cuda.CUDAGraph once captured
    source: Any = None  # weak reference to the run conditioning last copied in
    update: StepUpdate | None = None  # a whole step's graph: how it updates the latents
    coefficients: torch.Tensor | None = None
    noise: torch.Tensor | None = None


class DenoiserGraphs:
    """Calls a :class:`MegaSRDenoiser` like the pipeline does, through CUDA graphs where it can."""

    def __init__(self, denoiser: MegaSRDenoiser, max_graphs: int = 16, capture: bool | None = None) -> None:
        self.denoiser = denoiser
        self.capture = denoiser.device.type == "cuda" if capture is None else capture
        if self.capture and denoiser.device.type != "cuda":
            raise ValueError("CUDA graphs need the denoiser on a CUDA device")
        self.max_graphs = max_graphs
        self.graphs: OrderedDict[tuple, _Graph] = OrderedDict()
        self._pool = torch.cuda.graph_pool_handle() if self.capture else None
        self._msfm_count = sum(1 for m in denoiser.modules() if isinstance(m, MSFM))
        self._csms = [getattr(block, CSM_ATTR) for _, block in denoiser._csm_blocks]
        self._hosts = [block.attn2 for _, block in denoiser._csm_blocks]
        # Token buffers whose keys/values are pinned in the CSMs; unpinned when this object goes,
        # so a dropped DenoiserGraphs leaves no buffers behind in the model.
        self._pinned_tokens: list[torch.Tensor] = []
        weakref.finalize(self, _unpin, self._csms, self._pinned_tokens)
        #: calls served from the static buffers (graph replays; without capture, eager runs on
        #: them) and calls passed straight to the model (first steps of runs, fallbacks)
        self.static_calls = 0
        self.eager_calls = 0
        #: why capturing was given up (every later call then runs eagerly), or ``None``
        self.failure: str | None = None

    # ------------------------------------------------------------------ calling
    def __call__(
        self,
        latents: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        *,
        control_image: torch.Tensor,
        conditioning: MegaSRConditioning,
        conditioning_scale: float = 1.0,
    ) -> torch.Tensor:
        """The denoiser's noise prediction; the same numbers as calling it eagerly."""
        return self._serve(latents, timestep, encoder_hidden_states, control_image, conditioning, conditioning_scale)

    def step(
        self,
        latents: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        *,
        control_image: torch.Tensor,
        conditioning: MegaSRConditioning,
        conditioning_scale: float,
        update: StepUpdate,
    ) -> torch.Tensor:
        """The latents after one whole sampling step (``latents``: one row per image; the text and
        the control image carry the CFG halves when ``update.guidance_scale`` is set); the same
        numbers as the step run eagerly."""
        return self._serve(
            latents, timestep, encoder_hidden_states, control_image, conditioning, conditioning_scale, update
        )

    def _serve(
        self,
        latents: torch.Tensor,
        timestep: torch.Tensor,
        text: torch.Tensor,
        control: torch.Tensor,
        conditioning: MegaSRConditioning,
        scale: float,
        update: StepUpdate | None = None,
    ) -> torch.Tensor:
        usable = self.failure is None and torch.is_tensor(timestep) and not torch.is_grad_enabled()
        if not usable or not self.ready(conditioning):
            self.eager_calls += 1
            if update is None:
                return self.denoiser(
                    latents, timestep, text, control_image=control, conditioning=conditioning, conditioning_scale=scale
                )
            return self._step(
                latents, timestep, text, control, conditioning, scale, update, update.coefficients, update.noise
            )
        key = self._key(latents, timestep, text, control, conditioning, scale)
        if update is not None:
            key += ("step", update.key, update.guidance_scale, update.noise is not None)
        entry = self.graphs.get(key)
        if entry is None:
            entry = self._build(latents, timestep, text, control, conditioning, update)
            self._fill(entry, latents, timestep, text, control, conditioning, update)
            try:
                self._capture(entry, scale)
            except torch.cuda.OutOfMemoryError:
                self._release(entry)
                raise  # the caller's out-of-memory handling (smaller batches) takes over
            except RuntimeError as error:  # an operation that cannot be captured: stay eager
                self._release(entry)
                self.failure = f"{type(error).__name__}: {error}"
                log.warning("CUDA graph capture failed, the denoiser runs eagerly from now on: %s", self.failure)
                return self._serve(latents, timestep, text, control, conditioning, scale, update)
            self.graphs[key] = entry
            while len(self.graphs) > self.max_graphs:
                self._release(self.graphs.popitem(last=False)[1])
        else:
            self.graphs.move_to_end(key)
            self._fill(entry, latents, timestep, text, control, conditioning, update)
        if entry.graph is not None:
            entry.graph.replay()
        else:
            entry.output = self._run(entry, scale)
        self.static_calls += 1
        assert entry.output is not None
        return entry.output.clone()

    def ready(self, conditioning: MegaSRConditioning) -> bool:
        """Whether a graph can serve this conditioning now.

        Needs every MSFM's modulation in the conditioning's cache (filled by one eager step) or
        no guidance maps at all; a conditioning that recomputes its modulation at every step
        (very large tiled images) always runs eagerly.
        """
        if conditioning.hed is None and conditioning.depth_seg is None:
            return True
        return conditioning.reuse_modulation and len(conditioning.modulation_cache) >= self._msfm_count

    def reset(self) -> None:
        """Drop every graph and its buffers (after the weights or the attention backend change)."""
        for entry in self.graphs.values():
            self._release(entry)
        self.graphs.clear()

    # ------------------------------------------------------------------ internals
    @staticmethod
    def _key(latents, timestep, text, control, conditioning: MegaSRConditioning, scale: float) -> tuple:
        tokens = conditioning.image_tokens
        layout = tuple(
            (name, None if value is None else (tuple(value[0].shape), tuple(value[1].shape)))
            for name, value in conditioning.modulation_cache.items()
        )
        return (
            tuple(latents.shape),
            latents.dtype,
            tuple(timestep.shape),
            timestep.dtype,
            tuple(text.shape),
            tuple(control.shape),
            None if tokens is None else (tuple(tokens.shape), tokens.dtype),
            conditioning.repeat,
            layout,
            float(scale),
        )

    def _build(self, latents, timestep, text, control, conditioning: MegaSRConditioning, update=None) -> _Graph:
        tokens = conditioning.image_tokens
        static = MegaSRConditioning(
            image_tokens=None if tokens is None else torch.empty_like(tokens),
            reuse_modulation=True,
            repeat=conditioning.repeat,
        )
        static.modulation_cache = {
            name: None if value is None else (torch.empty_like(value[0]), torch.empty_like(value[1]))
            for name, value in conditioning.modulation_cache.items()
        }
        entry = _Graph(
            torch.empty_like(latents),
            torch.empty_like(timestep),
            torch.empty_like(text),
            torch.empty_like(control),
            static,
        )
        if update is not None:
            entry.update = update
            entry.coefficients = torch.empty_like(update.coefficients)
            entry.noise = torch.empty_like(update.noise) if update.noise is not None else None
        if static.image_tokens is not None:
            self._pinned_tokens.append(static.image_tokens)
            for csm, host in zip(self._csms, self._hosts):
                key, value = csm.image_kv(host, tokens)
                static_key, static_value = torch.empty_like(key), torch.empty_like(value)
                csm.pin_kv(static.image_tokens, static_key, static_value)
                entry.kv.append((csm, static_key, static_value))
        return entry

    def _fill(
        self, entry: _Graph, latents, timestep, text, control, conditioning: MegaSRConditioning, update=None
    ) -> None:
        entry.latents.copy_(latents)
        entry.timestep.copy_(timestep)
        entry.text.copy_(text)
        entry.control.copy_(control)
        if update is not None:
            assert entry.coefficients is not None
            entry.coefficients.copy_(update.coefficients)
            if update.noise is not None:
                assert entry.noise is not None
                entry.noise.copy_(update.noise)
        if entry.source is not None and entry.source() is conditioning:
            return
        static = entry.conditioning
        if static.image_tokens is not None:
            tokens = conditioning.image_tokens
            static.image_tokens.copy_(tokens)
            for (csm, static_key, static_value), host in zip(entry.kv, self._hosts):
                key, value = csm.image_kv(host, tokens)
                static_key.copy_(key)
                static_value.copy_(value)
        for name, value in conditioning.modulation_cache.items():
            if value is not None:
                static.modulation_cache[name][0].copy_(value[0])
                static.modulation_cache[name][1].copy_(value[1])
        entry.source = weakref.ref(conditioning)

    def _run(self, entry: _Graph, scale: float) -> torch.Tensor:
        if entry.update is not None:
            return self._step(
                entry.latents,
                entry.timestep,
                entry.text,
                entry.control,
                entry.conditioning,
                scale,
                entry.update,
                entry.coefficients,
                entry.noise,
            )
        return self.denoiser(
            entry.latents,
            entry.timestep,
            entry.text,
            control_image=entry.control,
            conditioning=entry.conditioning,
            conditioning_scale=scale,
        )

    def _step(
        self,
        latents: torch.Tensor,
        timestep: torch.Tensor,
        text: torch.Tensor,
        control: torch.Tensor,
        conditioning: MegaSRConditioning,
        scale: float,
        update: StepUpdate,
        coefficients: torch.Tensor | None,
        noise: torch.Tensor | None,
    ) -> torch.Tensor:
        """A whole step: the pipeline's own operations, in its order (``_predict_noise``, then the update)."""
        cfg = update.guidance_scale is not None
        noise_pred = self.denoiser(
            guidance_batch(latents, cfg),
            timestep,
            text,
            control_image=control,
            conditioning=conditioning,
            conditioning_scale=scale,
        )
        if cfg:
            noise_pred = classifier_free_guidance(noise_pred, update.guidance_scale)
        assert coefficients is not None
        return update.update(coefficients, noise, noise_pred, latents)

    def _capture(self, entry: _Graph, scale: float) -> None:
        if not self.capture:
            return
        stream = torch.cuda.Stream(device=entry.latents.device)
        stream.wait_stream(torch.cuda.current_stream(entry.latents.device))
        with torch.cuda.stream(stream):
            for _ in range(WARMUP_RUNS):
                self._run(entry, scale)
        torch.cuda.current_stream(entry.latents.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            entry.output = self._run(entry, scale)
        entry.graph = graph

    def _release(self, entry: _Graph) -> None:
        tokens = entry.conditioning.image_tokens
        if tokens is not None:
            _unpin(self._csms, [tokens])
            self._pinned_tokens[:] = [t for t in self._pinned_tokens if t is not tokens]
        entry.graph = None
        entry.output = None


def _unpin(csms: list, tokens: list[torch.Tensor]) -> None:
    for token_buffer in tokens:
        for csm in csms:
            csm.unpin_kv(token_buffer)
