"""lottery: sparse neural networks by Continuous Sparsification, lottery-ticket search and pruning."""

__version__ = "0.1.0"
