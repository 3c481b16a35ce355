"""Everything that serves: the model thread and its continuous batch (scheduler.py, batch.py,
thread.py), what a client submits and receives (request.py), the prefix cache (prefix_cache.py),
and the HTTP app (app.py, http.py) with the OpenAI routes (openai.py)."""

from .app import create_app
from .prefix_cache import Held, PrefixCache
from .request import Event, QueueFull, Request
from .scheduler import Scheduler

__all__ = ["Event", "Held", "PrefixCache", "QueueFull", "Request", "Scheduler", "create_app"]
