"""embedfleet's client side: the wire contract, sources, storage, the client and the facade.

Nothing here imports from ``worker``: producers (ETL code, the CLI, the HTTP facade) must be
installable and runnable on machines that hold no model.
"""

__all__ = ["__version__"]
__version__ = "0.1.0"
