import pytest

from app.config import ConfigError, config_from_dict, list_presets, load_config, parse_workers


@pytest.mark.parametrize("preset", ["tiny", "small", "bench", "demo"])
def test_presets_load(preset):
    cfg = load_config(preset)
    assert cfg.name == preset
    assert cfg.model.d_model % cfg.model.n_head == 0


def test_presets_listed():
    assert {"tiny", "small", "bench", "demo"} <= set(list_presets())


def test_tiny_is_two_layers_width_64():
    m = load_config("tiny").model
    assert (m.n_layer, m.d_model) == (2, 64)


def test_preset_changes_only_what_it_names():
    base, tiny = load_config("base"), load_config("tiny")
    assert tiny.optim.beta2 == base.optim.beta2  # not in tiny.yaml → from base.yaml
    assert tiny.model.vocab_size != base.model.vocab_size  # in tiny.yaml


def test_overrides_apply_with_yaml_types():
    cfg = load_config("tiny", ["optim.lr=3e-4", "parallel.zero_stage=3", "data.sources=[stdlib, pydoc]"])
    assert cfg.optim.lr == pytest.approx(3e-4)
    assert cfg.parallel.zero_stage == 3
    assert cfg.data.sources == ["stdlib", "pydoc"]


def test_unknown_override_key_suggests_closest():
    with pytest.raises(ConfigError, match=r"unknown config key 'model.n_layr'; did you mean 'model.n_layer'\?"):
        load_config("tiny", ["model.n_layr=3"])


def test_unknown_yaml_key_suggests_closest(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("optim:\n  learning_rate: 0.1\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'optim.learning_rate'; did you mean 'optim.lr'\?"):
        load_config(str(path))


def test_unknown_preset_suggests_closest():
    with pytest.raises(ConfigError, match="did you mean 'tiny'"):
        load_config("tinny")


def test_bad_value_names_field():
    with pytest.raises(ConfigError, match="parallel.zero_stage") as err:
        load_config("tiny", ["parallel.zero_stage=4"])
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("name", ["a(b)", "with space", "-leading-dash", "x" * 129, "a/b"])
def test_a_run_name_the_registry_would_refuse_fails_before_training(name):
    # The end of a run publishes its model under this name; a bad one used to fail only after the whole run.
    with pytest.raises(ConfigError, match="not a valid run name") as err:
        load_config("tiny", [f"name={name}"])
    assert "\n" not in str(err.value) and "'name'" in str(err.value)
    assert load_config("tiny", ["name=bench-zero-2.offload_1"]).name == "bench-zero-2.offload_1"


def test_missing_field_named():
    tree = load_config("tiny").model_dump()
    del tree["optim"]["lr"]
    with pytest.raises(ConfigError, match="'optim.lr' is missing"):
        config_from_dict(tree)


def test_cross_field_validation():
    with pytest.raises(ConfigError, match="optim.warmup_steps"):
        load_config("tiny", ["optim.warmup_steps=1000"])


@pytest.mark.parametrize("spec,expected", [("2", (2, 2)), ("1:4", (1, 4)), (3, (3, 3))])
def test_parse_workers(spec, expected):
    assert parse_workers(spec) == expected


@pytest.mark.parametrize("spec", ["0", "3:1", "a:b", "1:2:3"])
def test_parse_workers_rejects(spec):
    with pytest.raises(ConfigError, match="parallel.workers"):
        parse_workers(spec)


def test_config_hash_ignores_name_but_not_lr():
    a = load_config("tiny")
    assert a.config_hash() == load_config("tiny", ["name=other", "storage=/elsewhere"]).config_hash()
    assert a.config_hash() != load_config("tiny", ["optim.lr=0.5"]).config_hash()


def test_workers_accepts_int_from_yaml_or_cli():
    assert load_config("tiny", ["parallel.workers=3"]).parallel.workers == "3"
    assert load_config("tiny", ["parallel.workers=1:4"]).parallel.workers == "1:4"
