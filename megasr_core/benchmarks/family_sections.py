"""SeeSR and SeeSR-Turbo in the GPU suite: the paper's Table 1 baseline, timed the way MegaSR is.

Random weights of the suite's preset (``MegaSRPipeline.from_preset(..., family=...)``, nothing
downloaded), the suite's output size, batch 1 and the suite's largest batch, eager and with the
denoiser step replayed from CUDA graphs:

* ``seesr_eager`` / ``seesr_cuda_graphs``: SeeSR at the suite's steps and CFG (by default 50 and
  5.5, SeeSR's own defaults and MegaSR's), so ``ratio_to_megasr`` and ``ratio_to_baseline``
  compare like with like;
* ``seesr_turbo_eager`` / ``seesr_turbo_cuda_graphs``: SeeSR-Turbo as it samples, 2 steps without
  CFG (its family defaults, whatever the suite's steps), so ``total_s`` is the end-to-end time
  of a real Turbo request; ``step_median_ms`` is its time per step and ``speedup_over_seesr``
  SeeSR's end-to-end time over Turbo's.

A family's pipeline is built by its first section (``build_s``) and dropped after its last, so at
most one of them sits in memory beside MegaSR's.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from megasr_core.families import SEESR, SEESR_TURBO, get_family

if TYPE_CHECKING:
    from .gpu_suite import GPUSuite

#: the sections of each family, eager first
FAMILY_SECTIONS: dict[str, tuple[str, str]] = {
    SEESR: ("seesr_eager", "seesr_cuda_graphs"),
    SEESR_TURBO: ("seesr_turbo_eager", "seesr_turbo_cuda_graphs"),
}


class FamilyBench:
    """One family's sections on one suite."""

    def __init__(self, suite: GPUSuite, family: str) -> None:
        self.suite, self.family = suite, family
        defaults = get_family(family).defaults
        turbo = family == SEESR_TURBO
        self.steps = defaults.steps if turbo else suite.steps
        self.guidance_scale = defaults.guidance_scale if turbo else suite.guidance_scale
        self.batches = sorted({1, suite.batches[-1]})
        self.pipeline = None

    def estimate_s(self) -> float:
        """Seconds a section needs (both batches, warm-ups included), for the suite's budget."""
        build = 0.0 if self.pipeline is not None else 15.0
        return build + sum(self.suite._estimate(b, self._repeats(b) + 2, steps=self.steps) for b in self.batches)

    def _repeats(self, batch: int) -> int:
        return self.suite.single_repeats if batch == 1 else 1

    def _build(self) -> dict[str, Any]:
        """Build the pipeline on first use; returns what to record about it (empty once built)."""
        if self.pipeline is not None:
            return {}
        from megasr_core.pipelines import MegaSRPipeline

        suite = self.suite
        seconds, self.pipeline = suite.clock.time(
            lambda: MegaSRPipeline.from_preset(
                suite.preset, device=suite.device, torch_dtype=suite.dtype, family=self.family
            )
        )
        return {"build_s": round(seconds, 2), "denoiser_parameters": self.pipeline.denoiser.parameter_counts()["total"]}

    def _rows(self, mode: str) -> dict[str, Any]:
        suite = self.suite
        rows: dict[str, Any] = {}
        for batch in self.batches:
            repeats = self._repeats(batch)
            if suite.remaining() < suite._estimate(batch, repeats + 1, steps=self.steps):
                rows[str(batch)] = {"skipped": "budget"}
                continue
            row = suite.time_pipeline(
                self.pipeline,
                batch,
                repeats,
                f"{self.family} {mode}",
                steps=self.steps,
                guidance_scale=self.guidance_scale,
                baseline=self.family != SEESR_TURBO,
            )
            rows[str(batch)] = {**row, **self._comparison(mode, batch, row["total_s"])}
        return rows

    def _comparison(self, mode: str, batch: int, total: float) -> dict[str, float]:
        """SeeSR against MegaSR, Turbo against SeeSR: same mode, same batch, when that row exists."""
        sections = self.suite.result["sections"]
        if self.family == SEESR_TURBO:
            other = (sections.get(f"seesr_{mode}") or {}).get(str(batch)) or {}
            return {"speedup_over_seesr": round(other["total_s"] / total, 2)} if "total_s" in other else {}
        other = (sections.get(f"megasr_{mode}") or {}).get(str(batch)) or {}
        return {"ratio_to_megasr": round(total / other["total_s"], 3)} if "total_s" in other else {}

    def _settings(self) -> dict[str, Any]:
        return {
            "family": self.family,
            "steps": self.steps,
            "guidance_scale": self.guidance_scale,
            "batches": self.batches,
        }

    def eager(self) -> dict[str, Any]:
        built = self._build()
        return {**self._settings(), **built, **self._rows("eager")}

    def cuda_graphs(self) -> dict[str, Any]:
        """With CUDA graphs (captured in the warm-up run; on a CPU the static-buffer path runs eagerly)."""
        from megasr_core.pipelines.acceleration import use_cuda_graphs

        built = self._build()
        use_cuda_graphs(self.pipeline)
        graphs = self.pipeline.denoiser_graphs
        try:
            rows = self._rows("cuda_graphs")
            counts = {
                "graph_shapes": len(graphs.graphs),
                "static_calls": graphs.static_calls,
                "eager_calls": graphs.eager_calls,
                "capture_failure": graphs.failure,
            }
        finally:
            use_cuda_graphs(self.pipeline, enabled=False)  # (drops the graphs: count them first)
        return {**self._settings(), **built, **rows, **counts}

    def release(self) -> None:
        """Drop the pipeline (the next family or section gets the memory)."""
        self.pipeline = None
        if self.suite.device.type == "cuda":
            torch.cuda.empty_cache()


def family_summary(sections: dict[str, Any], top_batch: int) -> dict[str, Any]:
    """The headline figures of the family sections, for the suite's ``summary``."""
    out: dict[str, Any] = {}
    for eager, graphs in FAMILY_SECTIONS.values():
        for name in (eager, graphs):
            rows = sections.get(name, {})
            if "total_s" in rows.get("1", {}):
                out[f"{name}_single_image_p50_s"] = rows["1"]["total_s"]
                out[f"{name}_step_ms_batch1"] = rows["1"]["step_median_ms"]
            if "images_per_s" in rows.get(str(top_batch), {}):
                out[f"{name}_images_per_s_batch{top_batch}"] = rows[str(top_batch)]["images_per_s"]
    return out
