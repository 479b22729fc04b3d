"""Serving: many conversations over one resident model.

`engine.Engine` is continuous batching as a Python API (requests join and leave between
decode steps; all running sequences decode together in one captured step). The HTTP server
(an OpenAI-compatible FastAPI app) and the Ray Serve deployment are thin layers on it.
"""
