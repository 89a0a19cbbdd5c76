"""`moeplan serve`: an OpenAI-compatible HTTP server over the runtime's Python API (runtime/textgen.py).

One small module per job: request schemas and their validation, OpenAI-shaped errors and responses, the
one-at-a-time generation queue, Prometheus metrics, the Starlette app, and the uvicorn server around it.
"""
