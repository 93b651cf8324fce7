"""Entry module for ``dramatiq actors.worker`` (what ``pipeline worker`` runs in each process).

Importing it reads the settings, opens the runtime, builds the broker and declares the
actors — once per worker process, at the edge.
"""

from __future__ import annotations

import logging

from actors.broker import make_broker
from actors.middleware import WorkerMetrics
from actors.tasks import declare_actors
from pipeline.runtime import Runtime
from pipeline.settings import load_settings

settings = load_settings()
logging.getLogger("pipeline").setLevel(settings.log_level)
# No pre-ping: one round trip less per transaction; a broken connection fails its attempt as an
# outage (retried) and makes the pool reconnect.
runtime = Runtime.from_settings(settings, pre_ping=False)
broker = make_broker(settings)
broker.add_middleware(WorkerMetrics())
actors = declare_actors(broker, runtime)
