from vlhub.engine.checkpoint import Checkpointer
from vlhub.engine.grad_cache import GradCache
from vlhub.engine.loggers import MetricLogger
from vlhub.engine.precision import Precision
from vlhub.engine.step import PlainGradients, train_step
from vlhub.engine.trainer import Trainer, build_gradient_strategy

__all__ = [
    "Checkpointer",
    "GradCache",
    "MetricLogger",
    "PlainGradients",
    "Precision",
    "Trainer",
    "build_gradient_strategy",
    "train_step",
]
