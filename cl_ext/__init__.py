"""cl-ext: class-incremental learning methods as Avalanche plugins."""

__version__ = "0.1.0"
