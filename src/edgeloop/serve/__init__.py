"""Servers a fleet talks to: the offload server (:mod:`edgeloop.serve.offload`) and the
load generator that measures it (:mod:`edgeloop.serve.loadgen`).

Import the modules themselves; this package imports nothing, so FastAPI and uvicorn (the
``[serve]`` extra) load only where a server runs.
"""
