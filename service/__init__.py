"""HTTP API of the MegaSR upscale service (FastAPI) and what it shares with the worker.

The API process never imports torch. Routes, contracts and storage arrive with the service issue.
"""
