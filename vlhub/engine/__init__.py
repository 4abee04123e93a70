from vlhub.engine.checkpoint import Checkpointer
from vlhub.engine.loggers import MetricLogger
from vlhub.engine.precision import Precision
from vlhub.engine.step import PlainGradients, train_step, unwrap
from vlhub.engine.trainer import Trainer

__all__ = ["Checkpointer", "MetricLogger", "PlainGradients", "Precision", "Trainer", "train_step", "unwrap"]
