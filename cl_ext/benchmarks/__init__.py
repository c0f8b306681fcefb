"""Class-incremental benchmarks as Avalanche streams, registered by name.

Every benchmark remaps labels to learning order (output unit k is the k-th class of the
recorded ``class_order``), so heads grow by appending units and "old classes" are simply
the first units.
"""

from cl_ext.benchmarks import permuted, vision
from cl_ext.benchmarks.common import ArrayDataset, class_incremental, resolve_class_order
from cl_ext.errors import DataNotFoundError

__all__ = ["ArrayDataset", "DataNotFoundError", "class_incremental", "permuted", "resolve_class_order", "vision"]
