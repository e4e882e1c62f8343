"""Overrides mean what they say: a string option takes the text as written, and an error message only
ever shows the value the user typed."""
import pytest

from lowmem_nablagfn.config import ConfigError, load_config, validate


@pytest.mark.parametrize("text", ["no", "off", "yes", "on", "null", "true", "False", "~", "1e4", "0"])
def test_string_option_takes_the_text_as_written(text):
    cfg = load_config("tiny_cpu", [f"logging.run_name={text}"])
    assert cfg.logging.run_name == text


def test_mixed_precision_no_is_fp32_from_the_command_line():
    cfg = validate(load_config("tiny_cpu", ["training.mixed_precision=bf16", "training.mixed_precision=no"]))
    assert cfg.training.mixed_precision == "no"  # the later override wins, as typed
    assert validate(load_config("tiny_cpu", ["--config.training.mixed_precision=no"])).training.mixed_precision == "no"


def test_quotes_and_optional_strings():
    cfg = load_config("tiny_cpu", ["logging.run_name='on'", 'pretrained.revision="no"', "reward.checkpoint=null",
                                   "reward.backbone=off"])
    assert cfg.logging.run_name == "on" and cfg.pretrained.revision == "no"
    assert cfg.reward.checkpoint is None  # an optional string: `null` unsets it
    assert cfg.reward.backbone == "off"


def test_non_string_options_still_parse_as_yaml():
    cfg = load_config("tiny_cpu", ["training.on_policy=yes", "model.no_flow=off", "model.reward_scale=1e4",
                                   "model.lora.target_modules=[to_q,to_v]", "sampling.num_steps=20"])
    assert cfg.training.on_policy is True and cfg.model.no_flow is False and cfg.model.reward_scale == 1e4
    assert cfg.model.lora.target_modules == ["to_q", "to_v"] and cfg.sampling.num_steps == 20


@pytest.mark.parametrize("override,shown", [
    ("seed=no", "seed=no: expected an integer"),
    ("training.num_epochs=yes", "training.num_epochs=yes: expected an integer"),
    ("model.reward_scale=off", "model.reward_scale=off: expected a number"),
    ("sampling.low_var_subsampling=null", "sampling.low_var_subsampling=null: expected true or false"),
    ("training.mixed_precision=off", "training.mixed_precision='off' is unknown"),
    ("training.mixed_precision=null", "training.mixed_precision='null' is unknown"),
])
def test_messages_show_only_what_was_typed(override, shown):
    with pytest.raises(ConfigError) as info:
        validate(load_config("tiny_cpu", [override]))
    message = str(info.value)
    assert shown in message, message
    for never in ("'False'", "'True'", "'None'", "False", "True", "None"):
        assert never not in message, message


def test_unquoted_yaml_boolean_in_a_preset_is_explained(tmp_path):
    preset = tmp_path / "p.yaml"
    preset.write_text("training:\n  mixed_precision: no\n")
    with pytest.raises(ConfigError, match=r"mixed_precision in .*p.yaml is an unquoted yes/no.*quote it") as info:
        load_config(str(preset))
    assert "False" not in str(info.value)
    preset.write_text('training:\n  mixed_precision: "no"\n')
    assert load_config(str(preset)).training.mixed_precision == "no"
