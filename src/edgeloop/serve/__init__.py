"""Servers a fleet talks to: the offload server (:mod:`edgeloop.serve.offload`), the
load generator that measures it (:mod:`edgeloop.serve.loadgen`), and the telemetry
collector (:mod:`edgeloop.serve.telemetry`, storage in
:mod:`edgeloop.serve.telemetry_store`; the ``[telemetry]`` extra).

Import the modules themselves; this package imports nothing, so FastAPI and uvicorn (the
``[serve]`` extra) load only where a server runs.
"""
