"""The MegaSR paper's published numbers for SeeSR and MegaSR, so a report shows them beside ours.

Transcribed from Table 1 of the MegaSR paper ("Quantitative comparison of contemporary ISR
methods on both synthetic and real-world datasets", discussed in Sec. 4.2, "Comparison with
State-of-the-Arts"): its ``SeeSR`` and ``MegaSR`` columns, one block per test set. The table's
blocks run RealSR, DIV2K-Val, DrealSR, DPED-iPhone; DPED-iPhone has no ground truth, so the paper
gives only the four no-reference metrics there. Every figure was checked against the paper text
by hand and by parsing the table's rows. They live in code because the package never reads the
paper at run time. MegaSR's RealSR MUSIQ is 70.0251 in Table 1 (the ablation tables of Sec. 4.3
print 70.0252; Table 1 is what is kept).
"""

from __future__ import annotations

#: Table 1, "MegaSR" column (the last one)
PAPER_MEGASR: dict[str, dict[str, float]] = {
    "realsr": {
        "psnr": 23.49,
        "ssim": 0.6903,
        "lpips": 0.3072,
        "niqe": 5.3795,
        "maniqa": 0.5574,
        "musiq": 70.0251,
        "clipiqa": 0.6790,
    },
    "drealsr": {
        "psnr": 25.74,
        "ssim": 0.7367,
        "lpips": 0.3258,
        "niqe": 6.6276,
        "maniqa": 0.5098,
        "musiq": 64.1473,
        "clipiqa": 0.6853,
    },
    "div2k-val": {
        "psnr": 22.05,
        "ssim": 0.5664,
        "lpips": 0.3157,
        "niqe": 4.8258,
        "maniqa": 0.5074,
        "musiq": 68.7602,
        "clipiqa": 0.6892,
    },
    "dped-iphone": {"niqe": 6.7751, "maniqa": 0.4653, "musiq": 56.3767, "clipiqa": 0.6201},
}

#: Table 1, "SeeSR" column (the ninth method; the paper ran SeeSR's public code and weights)
PAPER_SEESR: dict[str, dict[str, float]] = {
    "realsr": {
        "psnr": 23.60,
        "ssim": 0.6947,
        "lpips": 0.3007,
        "niqe": 5.4008,
        "maniqa": 0.5437,
        "musiq": 69.8200,
        "clipiqa": 0.6700,
    },
    "drealsr": {
        "psnr": 26.01,
        "ssim": 0.7330,
        "lpips": 0.3485,
        "niqe": 6.9710,
        "maniqa": 0.5290,
        "musiq": 64.4534,
        "clipiqa": 0.6816,
    },
    "div2k-val": {
        "psnr": 21.97,
        "ssim": 0.5673,
        "lpips": 0.3194,
        "niqe": 4.8095,
        "maniqa": 0.5036,
        "musiq": 68.6699,
        "clipiqa": 0.6936,
    },
    "dped-iphone": {"niqe": 6.7261, "maniqa": 0.4581, "musiq": 57.6794, "clipiqa": 0.6077},
}

#: the paper's columns a report shows, in Table 1's order (SeeSR before MegaSR)
PAPER_COLUMNS: dict[str, dict[str, dict[str, float]]] = {"SeeSR": PAPER_SEESR, "MegaSR": PAPER_MEGASR}


def paper_figures(dataset: str | None) -> dict[str, dict[str, float]]:
    """``{method: {metric: value}}`` of Table 1 for ``dataset`` (empty for folders that are not a test set)."""
    return {method: table[dataset] for method, table in PAPER_COLUMNS.items() if dataset in table}
