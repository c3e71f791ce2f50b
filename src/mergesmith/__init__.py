"""mergesmith: merge language models from mergekit-compatible YAML recipes."""

__version__ = "0.1.0"
