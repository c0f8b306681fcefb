"""Models: backbones wrapped in an incremental network whose head grows with the classes."""

from cl_ext.models.backbones import MLP, IncrementalNet, ResNet, linear_head

__all__ = ["MLP", "IncrementalNet", "ResNet", "linear_head"]
