from vlhub.models.open_clip_models import build_open_clip_model
from vlhub.models.towers import OpenClipImageTower, OpenClipTextTower, Tower, TowerOutput
from vlhub.models.vision_language import ImageStats, OpenClipLayout, VisionLanguageModel

__all__ = [
    "ImageStats",
    "OpenClipImageTower",
    "OpenClipLayout",
    "OpenClipTextTower",
    "Tower",
    "TowerOutput",
    "VisionLanguageModel",
    "build_open_clip_model",
]
