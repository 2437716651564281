"""The CUDA-graph path of the denoiser step, on a CPU: its static buffers run eagerly there.

What a graph replay can get wrong is its bookkeeping: an input not copied into its buffer, or a
run's conditioning (image tokens, CSM keys/values, MSFM modulation) left over from the run
before. Run eagerly on the same buffers, those mistakes change the output just as they would on
a GPU, so these tests compare against plain eager runs on weights where every MegaSR module and
the ControlNet are active.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data

from megasr_core.models.csm import CSM
from megasr_core.pipelines import MegaSRPipeline
from megasr_core.pipelines.acceleration import use_cuda_graphs
from megasr_core.pipelines.denoiser_graphs import DenoiserGraphs
from tests.models.helpers import perturb_zero_init

STEPS = 3


@pytest.fixture(scope="module")
def active_pipeline() -> MegaSRPipeline:
    """Tiny pipeline with the zero-initialized CSM/MSFM outputs and ControlNet convs randomized."""
    pipe = MegaSRPipeline.from_preset("tiny")
    assert perturb_zero_init(pipe.denoiser) > 0
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        controlnet = pipe.denoiser.controlnet
        for conv in [*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block]:
            conv.weight.copy_(torch.randn(conv.weight.shape, generator=generator) * 0.1)
    return pipe


@pytest.fixture(scope="module")
def photos() -> list[Image.Image]:
    return [
        Image.fromarray(data.chelsea()).resize((40, 28), Image.Resampling.BICUBIC),
        Image.fromarray(data.coffee()).resize((41, 28), Image.Resampling.BICUBIC),
        Image.fromarray(data.rocket()).resize((44, 30), Image.Resampling.BICUBIC),
    ]


def max_abs_diff(a: Image.Image, b: Image.Image) -> int:
    return int(np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16)).max())


def run(pipe, images, seeds, **kwargs):
    return pipe(images, seed=seeds, num_inference_steps=STEPS, **kwargs).images


def test_static_buffers_give_the_eager_output_run_after_run(active_pipeline, photos):
    pipe = active_pipeline
    first, second = (photos[:2], [1, 2]), ([photos[1], photos[0]], [5, 6])  # same shape, other conditioning
    expected = [run(pipe, *first), run(pipe, *second)]
    graphs = DenoiserGraphs(pipe.denoiser, capture=False)
    pipe.denoiser_graphs = graphs
    try:
        got = [run(pipe, *first), run(pipe, *second), run(pipe, *first)]
    finally:
        pipe.denoiser_graphs = None
    for want, have in zip(expected + expected[:1], got):
        for a, b in zip(want, have):
            assert max_abs_diff(a, b) == 0
    # one shape; each run's first step eager (it fills the caches the buffers copy), the rest static
    assert len(graphs.graphs) == 1
    assert (graphs.eager_calls, graphs.static_calls) == (3, 3 * (STEPS - 1))


def test_different_shapes_get_their_own_buffers_and_the_oldest_is_released(active_pipeline, photos):
    pipe = active_pipeline
    expected = run(pipe, photos[2], 3)
    use_cuda_graphs(pipe, max_graphs=1)
    graphs = pipe.denoiser_graphs
    try:
        run(pipe, photos[:2], [1, 2])
        got = run(pipe, photos[2], 3)
    finally:
        use_cuda_graphs(pipe, enabled=False)
    assert pipe.denoiser_graphs is None
    assert max_abs_diff(expected[0], got[0]) == 0
    assert graphs.graphs == {}  # reset by use_cuda_graphs(enabled=False)
    for module in pipe.denoiser.modules():
        if isinstance(module, CSM):
            assert module._pinned == []  # released buffers no longer stand in for any tokens


def test_eviction_keeps_one_shape(active_pipeline, photos):
    pipe = active_pipeline
    graphs = DenoiserGraphs(pipe.denoiser, capture=False, max_graphs=1)
    pipe.denoiser_graphs = graphs
    try:
        run(pipe, photos[:2], [1, 2])
        run(pipe, photos[2], 3)
    finally:
        pipe.denoiser_graphs = None
    assert len(graphs.graphs) == 1
    pinned = [len(m._pinned) for m in pipe.denoiser.modules() if isinstance(m, CSM)]
    assert pinned and set(pinned) == {1}
    graphs.reset()


def test_modulation_recomputed_per_step_stays_eager(active_pipeline, photos):
    """Tiled runs above max_cached_tiles recompute the MSFM modulation each step: no graph."""
    pipe = active_pipeline
    graphs = DenoiserGraphs(pipe.denoiser, capture=False)
    pipe.denoiser_graphs = graphs
    try:
        run(pipe, photos[0], 1, tile_size=16, tile_overlap=4, max_cached_tiles=0, tile_batch_size=1)
    finally:
        pipe.denoiser_graphs = None
    assert graphs.static_calls == 0 and graphs.eager_calls > STEPS and graphs.graphs == {}


def test_capture_needs_a_cuda_denoiser(active_pipeline):
    with pytest.raises(ValueError, match="CUDA device"):
        DenoiserGraphs(active_pipeline.denoiser, capture=True)


def test_a_failed_capture_leaves_the_denoiser_eager_for_good(active_pipeline, photos, monkeypatch, caplog):
    pipe = active_pipeline
    expected = run(pipe, photos[2], 3)
    graphs = DenoiserGraphs(pipe.denoiser, capture=False)

    def refuse(self, entry, scale):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(DenoiserGraphs, "_capture", refuse)
    pipe.denoiser_graphs = graphs
    try:
        got = run(pipe, photos[2], 3)
        run(pipe, photos[2], 3)
    finally:
        pipe.denoiser_graphs = None
    assert max_abs_diff(expected[0], got[0]) == 0
    assert "not permitted" in graphs.failure and "capture failed" in caplog.text
    assert graphs.graphs == {} and graphs.static_calls == 0 and graphs.eager_calls == 2 * STEPS


def test_out_of_memory_while_capturing_reaches_the_caller(active_pipeline, photos, monkeypatch):
    """The worker halves its batch on OOM; a capture must not swallow that signal."""
    graphs = DenoiserGraphs(active_pipeline.denoiser, capture=False)

    def out_of_memory(self, entry, scale):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(DenoiserGraphs, "_capture", out_of_memory)
    active_pipeline.denoiser_graphs = graphs
    try:
        with pytest.raises(torch.cuda.OutOfMemoryError):
            run(active_pipeline, photos[2], 3)
    finally:
        active_pipeline.denoiser_graphs = None
    assert graphs.failure is None and graphs.graphs == {}
    assert all(m._pinned == [] for m in active_pipeline.denoiser.modules() if isinstance(m, CSM))


def test_a_whole_step_is_one_graph_with_the_eager_steps_numbers(active_pipeline, photos):
    """Untiled DDPM runs replay the whole step (CFG batch, denoiser, CFG, DDPM update) from one graph
    per shape and CFG setting; the images are the eager run's, bit for bit, also with a CFG interval."""
    from megasr_core.pipelines.acceleration import use_cuda_graphs

    images = photos[:2]
    kwargs = {"seed": [1, 2], "num_inference_steps": 4, "cfg_interval": (0, 0.5)}
    eager = active_pipeline(images, **kwargs).images
    use_cuda_graphs(active_pipeline)
    try:
        graphs = active_pipeline.denoiser_graphs
        graphed = active_pipeline(images, **kwargs).images
        assert [image.tobytes() for image in graphed] == [image.tobytes() for image in eager]
        steps = [key for key in graphs.graphs if "step" in key]
        assert len(steps) == 2 and len(graphs.graphs) == 2  # with CFG and without; no denoiser-only graph
        assert {key[-2] for key in steps} == {5.5, None}  # the guidance scale baked in, or no CFG
        # the first step of each conditioning (with CFG, then without) fills its modulation eagerly
        assert (graphs.eager_calls, graphs.static_calls) == (2, 2)
    finally:
        use_cuda_graphs(active_pipeline, enabled=False)


def test_tiled_runs_and_other_samplers_graph_the_denoiser_alone(active_pipeline, photos):
    from megasr_core.pipelines.acceleration import use_cuda_graphs

    use_cuda_graphs(active_pipeline)
    try:
        graphs = active_pipeline.denoiser_graphs
        active_pipeline(photos[0], seed=1, num_inference_steps=3, sampler="unipc")
        active_pipeline(photos[0], seed=1, num_inference_steps=2, tile_size=16, tile_overlap=4)
        assert graphs.graphs and not any("step" in key for key in graphs.graphs)
    finally:
        use_cuda_graphs(active_pipeline, enabled=False)
