"""Where MegaSR weights come from: a local folder, or a Hugging Face Hub repository.

``resolve_weights_source`` is the one place a weights *source* becomes a local folder:

* an existing folder is used as it is;
* ``hf://org/name`` or ``hf://org/name@revision`` (a branch, tag or commit hash), or a bare
  ``org/name[@revision]`` that is not an existing folder, is fetched with
  ``huggingface_hub.snapshot_download`` into the Hub cache (``HF_HOME`` / ``HF_HUB_CACHE``),
  only the files of the MegaSR layout (``ALLOW_PATTERNS``). ``HF_HUB_OFFLINE=1`` uses the
  cache alone; private and gated repositories use ``HF_TOKEN`` (or ``hf auth login``'s token),
  which huggingface_hub reads itself, so it never passes through (or is logged by) this code.

The cache, offline and endpoint (``HF_ENDPOINT``) variables are read when called, not when huggingface_hub was first
imported, so they take effect however early diffusers/transformers imported it.
Torch-free: the init container (``worker.fetch_weights``) uses it too.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

#: The MegaSR weights layout (``megasr_core.weights.layout``): what a complete folder must hold.
REQUIRED_FILES = ("model_index.json", "megasr.json")
REQUIRED_DIRS = ("unet", "controlnet", "vae", "text_encoder", "tokenizer", "scheduler")
OPTIONAL_DIRS = ("extractors",)
#: ``snapshot_download`` patterns (fnmatch: ``*`` crosses ``/``): the layout, nothing else of the repo.
ALLOW_PATTERNS = [*REQUIRED_FILES, *(f"{name}/*" for name in (*REQUIRED_DIRS, *OPTIONAL_DIRS))]

HF_SCHEME = "hf://"
# ``hf:/`` too: pathlib (typer/pydantic ``Path`` values) folds the scheme's ``//`` into one ``/``.
_HF_URL = re.compile(r"^hf:/{1,2}(?P<repo>[^/@]+/[^/@]+?)/?(?:@(?P<revision>.+))?$")
_BARE_REPO = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]*[A-Za-z0-9_])(?:@(?P<revision>.+))?$")
_TRUE = {"1", "ON", "YES", "TRUE"}


class WeightsSourceError(ValueError):
    """A weights source cannot be turned into a complete local MegaSR weights folder."""


@dataclass(frozen=True)
class HubWeights:
    """A Hub repository holding a MegaSR weights layout, at ``revision`` (None: its default branch)."""

    repo_id: str
    revision: str | None = None

    def __str__(self) -> str:
        return f"{HF_SCHEME}{self.repo_id}" + (f"@{self.revision}" if self.revision else "")


def parse_hub_source(source: str | Path, revision: str | None = None) -> HubWeights | None:
    """The Hub repository ``source`` names, or None for a local path.

    A bare ``org/name`` counts as a Hub id only when no such folder exists (diffusers' rule).
    ``revision`` and an ``@revision`` in ``source`` must agree.
    """
    text = str(source)
    match = _HF_URL.match(text)
    if match is None and not Path(source).exists():
        match = _BARE_REPO.match(text)
    if match is None:
        if text.startswith("hf:"):
            raise WeightsSourceError(f"{text!r} is not a Hub weights id: use hf://org/name or hf://org/name@revision")
        return None
    pinned = match["revision"]
    if pinned and revision and pinned != revision:
        raise WeightsSourceError(f"{text} pins revision {pinned!r} but revision={revision!r} was given")
    return HubWeights(match["repo"], pinned or revision)


def missing_parts(directory: Path) -> list[str]:
    """Parts of the MegaSR layout ``directory`` lacks (empty: complete)."""
    missing = [name for name in REQUIRED_FILES if not (directory / name).is_file()]
    return missing + [name for name in REQUIRED_DIRS if not (directory / name).is_dir()]


def hub_offline() -> bool:
    """``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``) as huggingface_hub reads it, but now."""
    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return value.strip().upper() in _TRUE


def hub_cache_dir() -> str | None:
    """``HF_HUB_CACHE``, else ``$HF_HOME/hub``, else None (huggingface_hub's own default)."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.path.expanduser(os.environ["HF_HUB_CACHE"])
    if os.environ.get("HF_HOME"):
        return os.path.join(os.path.expanduser(os.environ["HF_HOME"]), "hub")
    return None


def download(hub: HubWeights, local_dir: Path | None = None) -> Path:
    """``snapshot_download`` of the layout's files; Hub failures become ``WeightsSourceError``.

    With ``local_dir`` the files are written there instead of the cache (huggingface_hub skips
    those already present and up to date).
    """
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    offline = hub_offline()
    try:
        path = snapshot_download(
            hub.repo_id,
            revision=hub.revision,
            allow_patterns=ALLOW_PATTERNS,
            cache_dir=hub_cache_dir(),
            local_dir=local_dir,
            endpoint=os.environ.get("HF_ENDPOINT") or None,  # a Hub mirror
            local_files_only=offline,
        )
    except GatedRepoError:  # before RepositoryNotFoundError, its base class
        raise WeightsSourceError(
            f"{hub} is a gated repository: accept its terms on the Hub, then set HF_TOKEN to a token of that account"
        ) from None
    except RevisionNotFoundError:
        raise WeightsSourceError(f"{hub}: repository {hub.repo_id} has no revision {hub.revision!r}") from None
    except RepositoryNotFoundError:
        raise WeightsSourceError(
            f"{hub}: repository {hub.repo_id} not found (or private: set HF_TOKEN to a token that can read it)"
        ) from None
    except LocalEntryNotFoundError:
        if offline:
            raise WeightsSourceError(
                f"{hub}: repository {hub.repo_id} at revision {hub.revision or 'main'} is not in the Hub cache "
                f"({hub_cache_dir() or 'the default HF_HOME'}) and HF_HUB_OFFLINE is set: download it once "
                "without HF_HUB_OFFLINE, or point HF_HOME at a cache that holds it"
            ) from None
        raise WeightsSourceError(f"{hub}: the Hub cannot be reached and the weights are not cached") from None
    except HfHubHTTPError as exc:
        status = exc.response.status_code if exc.response is not None else "no"
        raise WeightsSourceError(f"{hub}: the Hub answered HTTP {status}") from None
    path = Path(path)
    missing = missing_parts(path)
    if missing:
        raise WeightsSourceError(f"{hub} is not a complete MegaSR weights directory: missing {', '.join(missing)}")
    return path


def resolve_weights_source(source: str | Path, revision: str | None = None) -> Path:
    """A local folder holding the weights ``source`` names (see the module docstring).

    Raises ``FileNotFoundError`` for a local folder that does not exist, ``WeightsSourceError``
    for a Hub id that cannot be fetched.
    """
    hub = parse_hub_source(source, revision)
    if hub is None:
        directory = Path(source)
        if not directory.is_dir():
            raise FileNotFoundError(f"weights directory {directory} does not exist")
        if revision is not None:
            raise WeightsSourceError(f"revision={revision!r} needs a Hub id, but {directory} is a local folder")
        return directory
    return download(hub)
