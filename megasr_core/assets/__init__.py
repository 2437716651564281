"""Data files the library reads at run time (RAM's tag vocabulary, NIQE's natural-scene model),
apart from the training data code in ``megasr_core.data``; read them with
``importlib.resources.files("megasr_core.assets")``. See README.md here for their sources."""
