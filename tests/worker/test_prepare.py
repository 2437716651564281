"""``worker.main.prepare``: what a worker process sets on its pipeline before it reports ready."""

from __future__ import annotations

from tests.service.helpers import make_settings


def test_prepare_applies_the_work_bound_of_the_settings(tmp_path, redis_url, tiny_weights):
    """The API refuses work above MEGASR_MAX_OUTPUT_PIXELS; the worker's pipeline refuses it again
    with the same number, not its own default."""
    from worker.main import prepare

    settings = make_settings(tmp_path, redis_url, max_output_pixels=600 * 600, warmup_buckets="64x64")
    runtime = prepare(settings, tiny_weights, device="cpu")
    try:
        assert runtime.pipeline.max_output_pixels == 600 * 600
        assert runtime.metrics.is_ready
    finally:
        runtime.stop()


def test_prepare_loads_the_precision_of_the_settings_and_announces_it(tmp_path, redis_url, tiny_weights):
    """MEGASR_PRECISION=fp8: the worker's denoiser has float8 linear layers, and its ModelInfo (what
    /v1/models and every job record show) says so."""
    from worker.main import prepare

    settings = make_settings(tmp_path, redis_url, precision="fp8", warmup_buckets="64x64")
    runtime = prepare(settings, tiny_weights, device="cpu")
    try:
        assert runtime.pipeline.precision == "fp8"
        assert runtime.model_info().precision == "fp8"
        to_q = runtime.pipeline.denoiser.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q
        assert type(to_q.weight).__name__ == "Float8Tensor"
    finally:
        runtime.stop()


def test_warm_up_covers_every_padded_batch_size():
    """With padded batches (CUDA graphs, compile) a worker meets every bucket up to its own batch."""
    from megasr_core.pipelines.batching import BATCH_BUCKETS
    from worker.main import warmup_batch_sizes

    assert warmup_batch_sizes(8, None) == [1, 8] and warmup_batch_sizes(1, None) == [1]
    assert warmup_batch_sizes(8, BATCH_BUCKETS) == [1, 2, 4, 8]
    assert warmup_batch_sizes(6, BATCH_BUCKETS) == [1, 2, 4, 8]  # 5 or 6 jobs run padded to 8
    assert warmup_batch_sizes(20, BATCH_BUCKETS) == [1, 2, 4, 8, 16, 20]


def test_the_large_warm_up_steps_the_tile_batch_down_until_it_fits(tmp_path, redis_url):
    """On CUDA the worker warms 2048² at batch 1 with all its tiles in one model batch; where that runs
    out of memory it tries 4, then 1, and jobs start with what fitted."""
    import torch

    from tests.service.helpers import StandIn
    from worker.main import warm_up_large
    from worker.runtime import install_runtime

    class FitsAtFour(StandIn):
        def __init__(self) -> None:
            super().__init__()
            self.tile_batches: list[int] = []

        def __call__(self, images, **kwargs):
            self.tile_batches.append(kwargs["tile_batch_size"])
            if kwargs["tile_batch_size"] > 4:
                raise torch.cuda.OutOfMemoryError("CUDA out of memory (injected)")
            return super().__call__(images, **kwargs)

    pipeline = FitsAtFour()
    runtime = install_runtime(make_settings(tmp_path, redis_url), pipeline)
    warm_up_large(runtime, [(2048, 2048)])
    assert pipeline.tile_batches == [16, 4] and runtime.tile_batch_cap == 4
