"""`--prompt-config NAME`: a bare preset name is the preset even when the working directory holds
a folder or file of that name (issue 20); an explicit path (./math, math.yaml) is the file."""

import pytest

from posttrain.errors import ConfigError
from posttrain.server.prompt_config import PRESETS_DIR, load_prompt_config


def test_a_local_folder_named_like_a_preset_does_not_hide_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "math").mkdir()  # e.g. a data folder
    (tmp_path / "gsm8k").write_text("not: [yaml")  # a stray file without a suffix
    preset = load_prompt_config(str(PRESETS_DIR / "math.yaml"))
    assert load_prompt_config("math") == preset
    assert load_prompt_config("gsm8k").name == "gsm8k"
    with pytest.raises(ConfigError, match="a folder, not a YAML file"):
        load_prompt_config("./math")


def test_an_explicit_path_is_the_file_even_with_a_preset_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "math.yaml").write_text("system_prompt: mine\n")
    (tmp_path / "plain").write_text("system_prompt: local\n")
    assert load_prompt_config("math.yaml").system_prompt == "mine"
    assert load_prompt_config("./plain").system_prompt == "local"
    assert load_prompt_config(str(tmp_path / "plain")).system_prompt == "local"
    assert load_prompt_config("plain").system_prompt != "local"  # the bare name stays the preset


def test_an_unknown_name_lists_the_presets(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match="math"):
        load_prompt_config("nosuchpreset")
