"""Presets (``# @package _global_``): the field's published runs and vlhub's comparisons.

A Hydra search-path root (``hydra.searchpath: [pkg://vlhub.experiments]`` in configs/train.yaml);
its ``experiment/`` folder is the config group, so ``+experiment=NAME`` picks experiment/NAME.yaml.
Shipped inside the package as ``vlhub.experiments`` (pyproject's package-dir), like configs/.
"""
