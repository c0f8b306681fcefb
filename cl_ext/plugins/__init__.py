"""cl-ext method plugins (Avalanche ``SupervisedPlugin`` subclasses), one method per module."""

from cl_ext.memory import ExemplarMemoryPlugin
from cl_ext.plugins.eeil import EEILPlugin
from cl_ext.plugins.slnid import SLNIDPlugin
from cl_ext.plugins.ucir import UCIRPlugin

__all__ = ["EEILPlugin", "ExemplarMemoryPlugin", "SLNIDPlugin", "UCIRPlugin"]
