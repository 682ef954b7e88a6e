"""Config validation: unknown keys, wrong types and values, options of an inactive method."""

from __future__ import annotations

import pytest

from nocollapse.config import Config, ConfigError, build_config, config_from_dict, to_dict


def test_defaults_and_overrides_are_typed():
    cfg, explicit = build_config(overrides=["optim.lr=0.1", "views.global_scale=[0.3, 1.0]"])
    assert cfg.optim.lr == 0.1 and cfg.views.global_scale == [0.3, 1.0]
    assert explicit == {"optim.lr", "views.global_scale"}


def test_unknown_key_names_the_key_and_the_closest_valid_ones():
    with pytest.raises(ConfigError) as info:
        build_config(overrides=["optim.lrr=0.1"])
    assert "optim.lrr" in str(info.value) and "'optim.lr'" in str(info.value)
    with pytest.raises(ConfigError, match="method.head.hidden_dim"):
        build_config(overrides=["method.head.hidden=3"])


def test_unknown_key_in_a_file_is_rejected(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  epoch: 3\n")
    with pytest.raises(ConfigError, match="train.epochs"):
        build_config(path)


def test_wrong_type_names_the_key_and_what_is_allowed():
    with pytest.raises(ConfigError, match=r"optim.lr: 'abc' is not valid; expected a number"):
        build_config(overrides=["optim.lr=abc"])
    with pytest.raises(ConfigError, match=r"train.epochs.*integer"):
        build_config(overrides=["train.epochs=2.5"])


def test_wrong_value_names_the_choices_or_the_range():
    with pytest.raises(ConfigError, match="optim.name: 'rmsprop' is not allowed; expected one of 'adamw', 'adam', "
                                          "'sgd', 'lars'"):
        build_config(overrides=["optim.name=rmsprop"])
    with pytest.raises(ConfigError, match="train.batch_size.*>= 2"):
        build_config(overrides=["train.batch_size=1"])
    with pytest.raises(ConfigError, match="global_scale"):
        build_config(overrides=["views.global_scale=[0.9, 0.2]"])


def test_option_of_another_method_is_rejected_not_ignored():
    with pytest.raises(ConfigError, match="carp.block_size only apply when method.name is 'carp'"):
        build_config(overrides=["carp.block_size=64"])
    with pytest.raises(ConfigError, match="gmm.eta only apply when method.prototypes is 'decoupled'"):
        build_config(overrides=["gmm.eta=0.1"])
    with pytest.raises(ConfigError, match="koleo"):
        build_config(overrides=["method.prototypes=decoupled", "method.koleo_weight=0.1"])


def test_override_that_switches_off_a_recipe_key_is_accepted(tmp_path):
    """--set swav.queue_length=0 on a recipe that starts its queue at some epoch turns the queue
    off; the recipe's queue_start_epochs becomes moot, not an error. The same key set by the user,
    or by a file to which it does not apply, is still rejected."""
    recipe = tmp_path / "swav.yaml"
    recipe.write_text("method:\n  name: swav\nswav:\n  queue_length: 512\n  queue_start_epochs: 1.0\n")
    cfg, _ = build_config(recipe, ["swav.queue_length=0"])
    assert cfg.swav.queue_length == 0
    with pytest.raises(ConfigError, match="swav.queue_start_epochs only apply when swav.queue_length > 0"):
        build_config(recipe, ["swav.queue_length=0", "swav.queue_start_epochs=2"])
    broken = tmp_path / "broken.yaml"
    broken.write_text("method:\n  name: swav\nswav:\n  queue_length: 0\n  queue_start_epochs: 1.0\n")
    with pytest.raises(ConfigError, match="swav.queue_start_epochs only apply when swav.queue_length > 0"):
        build_config(broken, ["train.epochs=2"])


def test_section_and_malformed_overrides():
    with pytest.raises(ConfigError, match="is a section"):
        build_config(overrides=["optim=1"])
    with pytest.raises(ConfigError, match="key=value"):
        build_config(overrides=["optim.lr"])


def test_resolved_config_round_trips():
    cfg, _ = build_config(overrides=["method.name=carp", "carp.block_size=64", "method.num_prototypes=256"])
    assert config_from_dict(to_dict(cfg)) == cfg
    assert config_from_dict(to_dict(Config())) == Config()


def test_settings_validators_run_for_merged_method_keys_and_own_sections():
    # PrototypeSettings.validate checks two method.* keys (merged into the method section)
    with pytest.raises(ConfigError, match="teacher_momentum_end must be >= method.teacher_momentum"):
        build_config(overrides=["method.teacher_momentum=0.99", "method.teacher_momentum_end=0.9"])
    # CarpSettings.validate checks its own section against method.num_prototypes
    with pytest.raises(ConfigError, match=r"carp.block_size \(100\) must divide method.num_prototypes"):
        build_config(overrides=["method.name=carp", "carp.block_size=100"])
    # GmmSettings.validate runs only when gmm.* applies
    with pytest.raises(ConfigError, match="gmm.refresh_every_epochs needs a buffer"):
        build_config(overrides=["method.prototypes=decoupled", "gmm.refresh_every_epochs=1"])
