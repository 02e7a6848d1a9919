from pathlib import Path

import pytest
import yaml

from medfm.config import BUILTIN_BASE_RECIPES, BUILTIN_TINY_SD, BUILTIN_TINY_VLM, ConfigError, TrainConfig, parse_train_config


def write_yaml(path, values):
    path.write_text(yaml.safe_dump(values))
    return str(path)


def test_flags_override_yaml_which_overrides_defaults(tmp_path):
    config_file = write_yaml(tmp_path / "c.yaml", {"rank": 16, "learning_rate": 5e-5, "use_8bit_adam": False})
    config = parse_train_config(["--config", config_file, "--rank", "32", "--validation_prompt", "Cardiomegaly.", "Small left effusion."])
    assert config.rank == 32
    assert config.learning_rate == 5e-5
    assert config.use_8bit_adam is False
    assert config.validation_prompt == ["Cardiomegaly.", "Small left effusion."]
    assert config.max_train_steps == BUILTIN_BASE_RECIPES[BUILTIN_TINY_SD]["max_train_steps"]  # the built-in base's recipe, not set here


def test_the_embedded_run_brings_its_recipe_and_a_real_base_or_own_data_keeps_the_defaults():
    assert parse_train_config(["--pretrained_model_name_or_path", "stable-diffusion-v1-5/stable-diffusion-v1-5"]).to_dict() == {
        **TrainConfig().to_dict(), "pretrained_model_name_or_path": "stable-diffusion-v1-5/stable-diffusion-v1-5"}
    assert parse_train_config(["--train_data_dir", "/data/pairs"]).rank == TrainConfig().rank
    report = parse_train_config(["--task", "report", "--learning_rate", "3e-4"])
    assert report.learning_rate == 3e-4 and report.modules_to_save == BUILTIN_BASE_RECIPES[BUILTIN_TINY_VLM]["modules_to_save"]


@pytest.mark.parametrize(("demo", "task"), [("demo-text-to-image.yaml", "text-to-image"), ("demo-report.yaml", "report")])
def test_demo_recipe_files_write_out_the_embedded_default(demo, task):
    recipe = Path(__file__).resolve().parents[1] / "recipes" / "configs" / demo
    from_file = parse_train_config(["--config", str(recipe)]).to_dict()
    embedded = parse_train_config(["--task", task]).to_dict()
    assert {k: v for k, v in from_file.items() if k != "output_dir"} == {k: v for k, v in embedded.items() if k != "output_dir"}


def test_boolean_flags_have_negations():
    assert parse_train_config(["--no-use_8bit_adam"]).use_8bit_adam is False
    assert parse_train_config(["--train_text_encoder"]).train_text_encoder is True


def test_unknown_key_names_the_key_a_suggestion_and_the_accepted_keys(tmp_path):
    config_file = write_yaml(tmp_path / "bad.yaml", {"learning_rte": 1e-4})
    with pytest.raises(ConfigError) as err:
        parse_train_config(["--config", config_file], exit_on_error=False)
    message = str(err.value)
    assert "bad.yaml" in message and "'learning_rte'" in message
    assert "Did you mean 'learning_rate'?" in message
    assert "pretrained_model_name_or_path" in message  # the accepted keys are listed


@pytest.mark.parametrize("values, fragment", [
    ({"rank": "four"}, "'rank' must be int"),
    ({"use_8bit_adam": "yes"}, "'use_8bit_adam' must be bool"),
    ({"validation_prompt": "one prompt"}, "'validation_prompt' must be list[str]"),
    ({"mixed_precision": "fp8"}, "'mixed_precision' must be one of"),
])
def test_wrong_type_or_choice_stops_before_work(tmp_path, values, fragment):
    with pytest.raises(ConfigError, match=fragment.replace("[", r"\[").replace("]", r"\]")):
        parse_train_config(["--config", write_yaml(tmp_path / "c.yaml", values)], exit_on_error=False)


def test_integers_are_accepted_for_floats(tmp_path):
    assert parse_train_config(["--config", write_yaml(tmp_path / "c.yaml", {"snr_gamma": 5})]).snr_gamma == 5


def test_inconsistent_values_are_rejected():
    with pytest.raises(ConfigError, match="rank must be >= 1"):
        TrainConfig(rank=0)
    with pytest.raises(ConfigError, match="only one of"):
        TrainConfig(train_data_dir="a", dataset_name="b")


def test_every_shipped_recipe_config_is_valid():
    from pathlib import Path

    from medfm.config import load_config

    configs = sorted((Path(__file__).resolve().parents[1] / "recipes" / "configs").glob("*.yaml"))
    assert configs
    for path in configs:
        assert path.read_text().startswith("# accelerate launch recipes/train_lora.py"), path  # opens with its command
        load_config(path)


def test_command_line_errors_are_one_line_not_a_traceback(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_train_config(["--config", write_yaml(tmp_path / "c.yaml", {"rank": "four"})])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "error: " in err and "'rank' must be int" in err and "Traceback" not in err
