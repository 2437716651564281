"""Weights I/O, in one place: a weights directory's layout, reading and writing its files,
loading its denoiser, and making one (tiny random, or assembled from upstream releases).

Modules: ``layout`` (what a folder holds), ``files`` (weight files: diffusers layouts, strict
key/shape checks), ``loading`` (a folder's denoiser, of its family's class), ``hub`` (a folder or
a Hugging Face Hub id → a local folder; torch-free), ``tiny`` (random weights for tests and
demos), ``upstream`` (assembly from SD2-base and SeeSR's releases), ``summary`` (what a folder
holds, trained or not), ``choice`` (which weights a command loads: ``--weights``,
``$MEGASR_WEIGHTS`` or the demo weights). This package imports none of them, so the torch-free
``hub`` stays torch-free; ``megasr_core.models`` imports only ``files``.
"""
