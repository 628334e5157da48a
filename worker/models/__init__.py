"""Models: resolving a reference to files and reading what the model is, its heads, one module per family."""
