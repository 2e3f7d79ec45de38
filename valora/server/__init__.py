"""OpenAI-compatible HTTP server: FastAPI app, protocol models, the async engine loop and Prometheus metrics."""
