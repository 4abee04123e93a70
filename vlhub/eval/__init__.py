from vlhub.eval.evaluator import Evaluator
from vlhub.eval.metrics import classification_metrics, mean_per_class_recall, topk_accuracy
from vlhub.eval.tasks import ImageFolderZeroShot, SyntheticZeroShot, ZeroShotTask
from vlhub.eval.zeroshot import build_zero_shot_classifier, zero_shot_metrics

__all__ = [
    "Evaluator",
    "ImageFolderZeroShot",
    "SyntheticZeroShot",
    "ZeroShotTask",
    "build_zero_shot_classifier",
    "classification_metrics",
    "mean_per_class_recall",
    "topk_accuracy",
    "zero_shot_metrics",
]
