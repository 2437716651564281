"""Decoding a job's stored input under the same budgets the API admitted it with.

The API refuses JPEGs with too many scans and decodes that take too long
(``service.decode_budget``); the worker applies both rules again before and while it decodes,
so an input stored before the rule existed, or under a laxer setting, cannot hold a GPU worker
for minutes. Both checks are cheap: a marker walk and a clock read per chunk.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from service.config import Settings
from service.decode_budget import BudgetedReader, DecodeRefused, check_jpeg_scans

if TYPE_CHECKING:
    from megasr_core.pipelines import PreparedImage


def load_input(data: bytes, settings: Settings) -> PreparedImage:
    """The decoded input; ``InvalidImageError`` (the job fails as ``invalid_input``, with this
    message) when it is over a decode budget or not a usable image."""
    from megasr_core.pipelines import InvalidImageError, load_image

    try:
        check_jpeg_scans(data, settings.max_jpeg_scans)
        reader = BudgetedReader(data, settings.max_decode_seconds)
        image = load_image(reader)
        reader.check()
    except DecodeRefused as exc:
        raise InvalidImageError(str(exc)) from None
    return image
