"""The worker-side commands of ``embedfleet``: run, worker, serve, shard."""
