"""mtlfast: fused multi-task training heads for PyTorch."""

from .functional import MultiTaskOutput, multitask_loss
from .module import MultiTaskHeads
from .pooling import last_token
from .task import Task, TaskLayout

__all__ = ["MultiTaskHeads", "MultiTaskOutput", "Task", "TaskLayout", "last_token", "multitask_loss"]
__version__ = "0.1.0"
