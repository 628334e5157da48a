"""embedfleet's worker side: the Celery app and tasks, the batching engine, backends and sinks.

It depends on ``producer`` (the wire contract), never the reverse.
"""
