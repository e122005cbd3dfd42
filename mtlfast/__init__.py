"""mtlfast: fused multi-task training heads for PyTorch."""

from .functional import MultiTaskOutput, multitask_loss
from .module import MultiTaskHeads
from .task import Task, TaskLayout

__all__ = ["MultiTaskHeads", "MultiTaskOutput", "Task", "TaskLayout", "multitask_loss"]
__version__ = "0.1.0"
