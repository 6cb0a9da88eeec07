"""The agents of the worker, one per module, each a thin loop around pure, typed functions.

`ROSTER` is the explicit list `stream_app.worker.app.build_worker` registers: nothing registers by import.
"""

from __future__ import annotations

from agents import ingest, profiles, reviews

ROSTER = (ingest.register, reviews.register, profiles.register)
