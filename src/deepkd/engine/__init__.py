"""The training core every task runs on: :class:`Task` (what to compute), :func:`run_task` (the loop,
checkpoints, resume, signals, meters, loggers), :func:`claim_run_folder` (lock and resume check)."""
from deepkd.engine.loop import NonFiniteLossError, Position, run_task
from deepkd.engine.run_folder import claim_run_folder
from deepkd.engine.task import TASKS, Task, Watch

__all__ = ["TASKS", "NonFiniteLossError", "Position", "Task", "Watch", "claim_run_folder", "run_task"]
