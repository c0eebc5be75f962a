"""Job configs: YAML + `--set` overrides, validated with errors that name field, value and rule."""

from __future__ import annotations

from typing import Literal

import pytest

from services.config import ConfigError, StrictModel, apply_overrides, load_config


class Optimizer(StrictModel):
    lr: float = 4e-4
    betas: tuple[float, float] = (0.9, 0.999)


class Job(StrictModel):
    name: str = "job"
    precision: Literal["fp32", "bf16", "fp8"] = "fp32"
    optimizer: Optimizer = Optimizer()


def test_yaml_values_and_overrides_are_merged_with_defaults(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("name: run1\noptimizer:\n  lr: 0.001\n")
    config = load_config(Job, path, ["optimizer.betas=[0.8, 0.9]", "precision=bf16"])
    assert config == Job(name="run1", precision="bf16", optimizer=Optimizer(lr=0.001, betas=(0.8, 0.9)))


def test_override_values_are_parsed_as_yaml_scalars():
    data = apply_overrides({}, ["a.b=3", "a.c=true", "d=hello"])
    assert data == {"a": {"b": 3, "c": True}, "d": "hello"}


def test_bad_value_error_names_field_value_and_allowed_choices():
    with pytest.raises(ConfigError) as error:
        load_config(Job, None, ["precision=fp16"])
    message = str(error.value)
    assert "precision" in message and '"fp16"' in message and "'fp32', 'bf16' or 'fp8'" in message


def test_unknown_key_is_an_error_not_ignored():
    with pytest.raises(ConfigError, match="optimizer.momentum"):
        load_config(Job, None, ["optimizer.momentum=0.9"])


def test_missing_file_and_malformed_override_are_clear_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(Job, tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="key.path=value"):
        load_config(Job, None, ["precision"])


def test_a_job_command_line_gives_the_validated_config_or_exits_2_naming_the_field(tmp_path, capsys):
    from services.config import job_config_from_command_line

    path = tmp_path / "job.yaml"
    path.write_text("name: run1\n")
    options = dict(doc="a job", example_config="configs/job.yaml", example_override="precision=bf16")
    config = job_config_from_command_line(Job, ["--config", str(path), "--set", "precision=bf16"], **options)
    assert config == Job(name="run1", precision="bf16")
    with pytest.raises(SystemExit) as exit_info:
        job_config_from_command_line(Job, ["--set", "precision=fp16"], **options)
    assert exit_info.value.code == 2 and "precision" in capsys.readouterr().err
