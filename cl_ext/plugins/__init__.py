"""cl-ext method plugins (Avalanche ``SupervisedPlugin`` subclasses), one method per module."""

from cl_ext.memory import ExemplarMemoryPlugin

__all__ = ["ExemplarMemoryPlugin"]
