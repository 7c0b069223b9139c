"""posttrain.logging: metric sinks (console, JSONL, TensorBoard, W&B, MLflow), the progress bar,
and the rollout and validation samples of a run folder (``samples.py``).

The folder shares its name with the standard library's ``logging``; modules here import
``logging`` absolutely, which gives the standard library.
"""

from posttrain.logging.metrics import MetricsLogger, format_console_line
from posttrain.logging.progress import ProgressBar

__all__ = ["MetricsLogger", "ProgressBar", "format_console_line"]
