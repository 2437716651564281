"""Which model a result came from, and whether it can be trusted: one record for every surface.

The CLI, the worker (job records, ``/v1/models``, ``/readyz``) and the page all show this, so a
user never mistakes the untrained demo weights or an assembled-but-untrained MegaSR folder for
real super-resolution. Pure Python, no torch (the API shows what workers announce).
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .families import get_family

#: reason given for the random weights ``megasr weights init-tiny`` writes
TINY_REASON = "tiny demo weights: random and untrained, the output is noise"
_SNAPSHOT = re.compile(r"models--(?P<org>[^/]+?)--(?P<name>[^/]+)/snapshots/(?P<commit>[0-9a-f]{7,64})/?$")


@dataclass(frozen=True)
class ModelIdentity:
    """A loaded model: its family, weights, precision, and why it is untrained (if it is)."""

    family: str
    weights: str
    dtype: str
    untrained_reasons: tuple[str, ...] = ()
    tagger: str | None = None
    precision: str = "full"  # the denoiser's linear layers: "full" (as loaded) or "fp8"
    default_steps: int = field(init=False)
    default_guidance_scale: float = field(init=False)

    def __post_init__(self) -> None:
        defaults = get_family(self.family).defaults
        object.__setattr__(self, "default_steps", defaults.steps)
        object.__setattr__(self, "default_guidance_scale", defaults.guidance_scale)

    @property
    def title(self) -> str:
        return get_family(self.family).title

    @property
    def trained(self) -> bool:
        return not self.untrained_reasons

    @property
    def untrained_reason(self) -> str | None:
        """The reasons in one sentence, or ``None`` for trained weights."""
        return "; ".join(self.untrained_reasons) or None

    def to_dict(self) -> dict[str, Any]:
        """The JSON form the service stores and shows (``service.contracts.ModelInfo`` fields)."""
        data = asdict(self)
        del data["untrained_reasons"]
        return {**data, "title": self.title, "trained": self.trained, "untrained_reason": self.untrained_reason}

    def warning(self) -> str | None:
        """A one-line warning for a terminal, or ``None`` for trained weights."""
        if self.trained:
            return None
        return (
            f"warning: the {self.title} weights {self.weights} are UNTRAINED ({self.untrained_reason}), so the "
            "output is not a real super-resolution. See docs/weights.md, 'Real output today'."
        )


def weights_label(directory: str | Path) -> str:
    """How a weights folder is named to users: ``hf://org/name@commit`` for a Hub snapshot, else its
    folder name (a server's directory layout is nobody's business)."""
    path = Path(directory).resolve()
    match = _SNAPSHOT.search(path.as_posix())
    if match:
        return f"hf://{match['org']}/{match['name']}@{match['commit'][:12]}"
    return path.name
