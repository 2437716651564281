"""``python -m megasr_core.cli`` (what ``accelerate launch -m megasr_core.cli train ...`` runs)."""

from . import main

main()
