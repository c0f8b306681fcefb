"""cl-ext method plugins (Avalanche ``SupervisedPlugin`` subclasses), one method per module."""

from cl_ext.memory import ExemplarMemoryPlugin
from cl_ext.plugins.bic import BiCPlugin
from cl_ext.plugins.eeil import EEILPlugin
from cl_ext.plugins.ewc import FacilFisherEWCPlugin
from cl_ext.plugins.icarl import ICaRLPlugin
from cl_ext.plugins.il2m import IL2MPlugin
from cl_ext.plugins.mas import SummedMASPlugin
from cl_ext.plugins.prototype import PrototypePlugin
from cl_ext.plugins.slnid import SLNIDPlugin
from cl_ext.plugins.topic import TOPICPlugin
from cl_ext.plugins.ucir import UCIRPlugin

__all__ = [
    "BiCPlugin",
    "EEILPlugin",
    "ExemplarMemoryPlugin",
    "FacilFisherEWCPlugin",
    "ICaRLPlugin",
    "IL2MPlugin",
    "PrototypePlugin",
    "SLNIDPlugin",
    "SummedMASPlugin",
    "TOPICPlugin",
    "UCIRPlugin",
]
