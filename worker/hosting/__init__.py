"""Celery hosting: the worker app, its tasks and lanes, the engine registry, and what keeps a fleet whole."""
