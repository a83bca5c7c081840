"""`python -m sparsebench ...` (and `torchrun -m sparsebench train ...`) does what `sparsebench` does."""
from sparsebench.cli import entry_point

entry_point()
