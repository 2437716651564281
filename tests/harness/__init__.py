"""Real services the tests start and stop: Valkey, SeaweedFS, uvicorn, a webhook receiver."""
