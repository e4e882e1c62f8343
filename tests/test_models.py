"""The models package's tables agree with the configuration's (which names them without importing torch)."""
import pytest

from lowmem_nablagfn import config
from lowmem_nablagfn.models import (BUILTIN_CONFIGS, NATIVE_RESOLUTION, SD3_BUILTIN_CONFIGS, SD3_NATIVE_RESOLUTION,
                                    SINGLE_FILE_SUFFIXES, builtin_configs)


def test_builtin_models_are_the_ones_the_config_accepts():
    assert tuple(SD3_BUILTIN_CONFIGS) == config.SD3_BUILTIN_MODELS == tuple(SD3_NATIVE_RESOLUTION)
    assert tuple(BUILTIN_CONFIGS) + config.SD3_BUILTIN_MODELS == config.BUILTIN_MODELS == tuple(NATIVE_RESOLUTION) + \
        tuple(SD3_NATIVE_RESOLUTION)
    assert SINGLE_FILE_SUFFIXES is config.SINGLE_FILE_SUFFIXES


def test_builtin_configs_are_fresh_and_unknown_names_are_refused():
    a = builtin_configs("sd15-random")
    a["unet"]["sample_size"] = 1
    assert builtin_configs("sd15-random")["unet"]["sample_size"] == 64
    assert set(builtin_configs("tiny-sdxl")) == {"unet", "vae", "text", "text_2"}
    with pytest.raises(ValueError, match="unknown built-in model 'sd21'.*tiny, sd15-random"):
        builtin_configs("sd21")
