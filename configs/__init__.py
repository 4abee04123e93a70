"""The config files (Hydra's ``pkg://vlhub.configs``). Importing the package, which every composition
of its YAML does, registers the resolvers they use (``${default:}``, ``${vlhub_objectives:}``) and the
structured schemas their defaults lists name (``trainer_schema``: the ``trainer`` node of train.yaml,
typed and with its defaults by vlhub/engine/trainer_config.py)."""

from hydra.core.config_store import ConfigStore

import vlhub.config_resolvers  # noqa: F401
from vlhub.engine.trainer_config import TrainerConfig

ConfigStore.instance().store(name="trainer_schema", node=TrainerConfig, package="trainer")
