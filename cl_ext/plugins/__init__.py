"""cl-ext method plugins (Avalanche ``SupervisedPlugin`` subclasses), one method per module."""

from cl_ext.memory import ExemplarMemoryPlugin
from cl_ext.plugins.bic import BiCPlugin
from cl_ext.plugins.il2m import IL2MPlugin

__all__ = ["BiCPlugin", "ExemplarMemoryPlugin", "IL2MPlugin"]
