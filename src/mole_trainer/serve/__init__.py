"""`mole serve`: the routed stack behind an OpenAI-compatible HTTP API (FastAPI + uvicorn)."""
