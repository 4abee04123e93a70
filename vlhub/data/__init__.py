from vlhub.data.batch import BadSample, BadSampleMonitor, Batch, LoadedBatch, RawSample
from vlhub.data.files import CsvPairs, ImageFolderPairs
from vlhub.data.loader import build_train_loader
from vlhub.data.sources import PairSource
from vlhub.data.synthetic import SyntheticShapes
from vlhub.data.wds import BlendedShards, ShardSource, WebDatasetPairs

__all__ = [
    "BadSample",
    "BadSampleMonitor",
    "Batch",
    "BlendedShards",
    "CsvPairs",
    "ImageFolderPairs",
    "LoadedBatch",
    "PairSource",
    "RawSample",
    "ShardSource",
    "SyntheticShapes",
    "WebDatasetPairs",
    "build_train_loader",
]
