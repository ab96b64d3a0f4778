"""serve/: run a built folder - text generation with a KV cache over a swappable step runner."""
