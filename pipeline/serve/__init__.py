"""`capline serve`: an HTTP captioning service with micro-batching (docs/serve.md)."""
