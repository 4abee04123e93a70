from vlhub.eval.evaluator import Evaluator
from vlhub.eval.fine_grained import AircraftZeroShot, Food101ZeroShot, INaturalist2021ZeroShot, StanfordCarsZeroShot
from vlhub.eval.imagenet import (
    ImageNetAZeroShot,
    ImageNetRZeroShot,
    ImageNetSketchZeroShot,
    ImageNetV2ZeroShot,
    ImageNetZeroShot,
)
from vlhub.eval.linear_probe import LinearProbeTask
from vlhub.eval.metrics import classification_metrics, mean_per_class_recall, topk_accuracy
from vlhub.eval.prompts import ClassNameTransform
from vlhub.eval.retrieval import PairValidationTask, RetrievalTask, clip_val_metrics, retrieval_recall
from vlhub.eval.subsets import ClassSubset, load_subset, mask_logits, restrict_logits
from vlhub.eval.tasks import EvalContext, ImageFolderZeroShot, SyntheticZeroShot, ZeroShotTask
from vlhub.eval.zeroshot import build_zero_shot_classifier

__all__ = [
    "AircraftZeroShot",
    "ClassNameTransform",
    "ClassSubset",
    "EvalContext",
    "Evaluator",
    "Food101ZeroShot",
    "INaturalist2021ZeroShot",
    "LinearProbeTask",
    "PairValidationTask",
    "RetrievalTask",
    "ImageFolderZeroShot",
    "ImageNetAZeroShot",
    "ImageNetRZeroShot",
    "ImageNetSketchZeroShot",
    "ImageNetV2ZeroShot",
    "ImageNetZeroShot",
    "StanfordCarsZeroShot",
    "SyntheticZeroShot",
    "ZeroShotTask",
    "build_zero_shot_classifier",
    "classification_metrics",
    "clip_val_metrics",
    "load_subset",
    "mask_logits",
    "mean_per_class_recall",
    "restrict_logits",
    "retrieval_recall",
    "topk_accuracy",
]
