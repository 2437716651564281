"""HTTP API of the MegaSR upscale service (FastAPI) and what it shares with the worker.

The API process never imports torch: images are validated with Pillow, and the worker task is
enqueued by its dotted path (``service.contracts.WORKER_TASK``).
"""
