"""Models: backbones wrapped in an incremental network whose head grows with the classes."""

from cl_ext.models.backbones import MLP, IncrementalNet, ResNet, linear_head
from cl_ext.models.cosine import CosineIncrementalClassifier, find_cosine_head, use_cosine_head
from cl_ext.models.pnn import ColumnReportPlugin, InputPNNLayer

__all__ = [
    "MLP",
    "ColumnReportPlugin",
    "CosineIncrementalClassifier",
    "IncrementalNet",
    "InputPNNLayer",
    "ResNet",
    "find_cosine_head",
    "linear_head",
    "use_cosine_head",
]
