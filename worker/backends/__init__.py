"""One module per backend behind one interface (``worker.backends.base.Backend``); which one runs
a model is decided in ``worker.backends.select``."""
