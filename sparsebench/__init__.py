"""sparsebench: an experiment runner for sparse neural-network training research."""

__version__ = "0.1.0"
