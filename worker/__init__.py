"""GPU worker: loads the MegaSR pipeline once and runs upscale jobs from the RQ queue."""
