from vlhub.data.batch import BadSample, BadSampleMonitor, Batch, LoadedBatch, RawSample
from vlhub.data.files import CsvPairs, ImageFolderPairs
from vlhub.data.loader import build_train_loader
from vlhub.data.sources import PairSource
from vlhub.data.synthetic import SyntheticShapes

__all__ = [
    "BadSample",
    "BadSampleMonitor",
    "Batch",
    "CsvPairs",
    "ImageFolderPairs",
    "LoadedBatch",
    "PairSource",
    "RawSample",
    "SyntheticShapes",
    "build_train_loader",
]
