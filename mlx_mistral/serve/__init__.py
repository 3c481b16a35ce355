"""Everything that serves, read in this order: what a client submits and receives
(request.py), the prefix cache (prefix_cache.py, its blocks in blocks.py and their disk tier in
disk_cache.py), the rows of the batch (batch.py), the model thread (thread.py), the scheduler
(scheduler.py), then the HTTP app (app.py, http.py), the one request builder (build.py) and each
API's routes (openai.py; anthropic_request.py, anthropic.py).

In one sentence: the Scheduler's ModelThread owns MLX and runs the model; a request waits in
the Scheduler's `_waiting` queue, then in a prefill Group; its prefix is found by
PrefixCache.take (an idle cache, or blocks); and it leaves the batch in Scheduler._leave, which
hands its cache and its blocks to the PrefixCache.
"""

from .app import create_app
from .prefix_cache import Held, PrefixCache
from .request import Event, QueueFull, Request
from .scheduler import Scheduler

__all__ = ["Event", "Held", "PrefixCache", "QueueFull", "Request", "Scheduler", "create_app"]
