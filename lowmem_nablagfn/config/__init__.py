"""The configuration tree: one dataclass per section, every field documented, presets in YAML.

Defaults are the official ``default_config.py`` settings of docs/algorithm.md ("Official defaults"),
except the model and the reward, which stay offline-friendly (``pretrained.model=tiny``,
``reward.name=builtin:redness``, ``prompts.set=simple_animals``): the paper's runs are the
``sd15_a100x8*`` presets.  Batch arithmetic, per process::

    trajectories per epoch  = sampling.batch_size * sampling.num_batches_per_epoch
    training batches/epoch  = trajectories per epoch / training.batch_size
    optimiser steps/epoch   = training batches/epoch / training.gradient_accumulation_steps
    transitions per update  = training.batch_size * accumulation * (K + 1),  K = int(T * fraction)

Overrides are dotted ``key=value`` pairs; the official README's spelling is accepted too
(``--config.model.reward_scale=1e4``), and so are its flags ``--seed`` and ``--exp_name``.
:func:`validate` reports every bad value, each with the reason and a fix, before any model is built.

Modules: :mod:`.schema` (the dataclass tree), :mod:`.loading` (presets, overrides), :mod:`.validation`,
:mod:`.cli` (the ``config`` / ``presets`` / ``help-config`` subcommands).  Presets are the YAML files
of the repository's top-level ``configs/``, installed with the package.
"""
from .cli import add_config_arguments
from .loading import PRESET_DIR, field_docs, list_presets, load_config, to_dict
from .schema import (BUILTIN_MODELS, SD3_BUILTIN_MODELS, SINGLE_FILE_SUFFIXES, Config, ConfigError, DistributedConfig,
                     LoggingConfig, LoraConfig, MemoryConfig, ModelConfig, MonitorConfig, PretrainedConfig, PromptConfig,
                     RewardConfig, SamplingConfig, TrainingConfig)
from .validation import block_widths_problem, is_sd3_model, norm_groups, validate

__all__ = ["BUILTIN_MODELS", "Config", "ConfigError", "DistributedConfig", "LoggingConfig", "LoraConfig",
           "MemoryConfig", "ModelConfig", "MonitorConfig", "PRESET_DIR", "PretrainedConfig", "PromptConfig",
           "RewardConfig",
           "SD3_BUILTIN_MODELS", "SINGLE_FILE_SUFFIXES", "SamplingConfig", "TrainingConfig", "add_config_arguments",
           "block_widths_problem", "field_docs", "is_sd3_model", "list_presets", "load_config", "norm_groups", "to_dict",
           "validate"]
