from vlhub.data.batch import BadSample, Batch, Filtered, LoadedBatch, RawSample
from vlhub.data.captions import Caption, CaptionPipeline
from vlhub.data.files import CsvPairs, ImageFolderPairs
from vlhub.data.loader import build_train_loader
from vlhub.data.pair_source import PairSource
from vlhub.data.subset_match import SubsetMatcher
from vlhub.data.synthetic import SyntheticShapes
from vlhub.data.wds import BlendedShards, ShardSource, WebDatasetPairs

__all__ = [
    "BadSample",
    "Batch",
    "BlendedShards",
    "Caption",
    "CaptionPipeline",
    "CsvPairs",
    "Filtered",
    "ImageFolderPairs",
    "LoadedBatch",
    "PairSource",
    "RawSample",
    "ShardSource",
    "SubsetMatcher",
    "SyntheticShapes",
    "WebDatasetPairs",
    "build_train_loader",
]
