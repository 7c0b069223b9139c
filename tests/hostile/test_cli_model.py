"""Models as users point at them: an empty folder, cut-off or missing files, a truncated or
garbage GGUF file, a device the machine lacks. One line naming the file, exit code 1."""

from __future__ import annotations

import pytest
import torch

from helpers import save_tiny_model

from hostile.cli_helpers import assert_one_clean_line, grpo_args, run_cli


def _grpo(capsys, model_path, tmp_path, *extra):
    return run_cli(capsys, grpo_args(model_path, tmp_path / "run", 1, *extra))


def test_empty_model_folder(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    code, err = _grpo(capsys, tmp_path / "empty", tmp_path)
    assert code == 1
    assert_one_clean_line(err, "empty", "config.json")


@pytest.mark.parametrize("how, fragment", [
    ("truncate_weights", "model.safetensors: truncated"),
    ("no_weights", "no weights"),
    ("no_tokenizer", "no tokenizer files"),
    ("garbage_config", "config.json: is not valid JSON"),
])
def test_broken_model_folder_names_the_file(tmp_path, capsys, how, fragment):
    folder = tmp_path / "model"
    save_tiny_model(folder)
    if how == "truncate_weights":
        weights = folder / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:2000])
    elif how == "no_weights":
        (folder / "model.safetensors").unlink()
    elif how == "no_tokenizer":
        for name in ("tokenizer.json", "tokenizer_config.json"):
            (folder / name).unlink()
    else:
        (folder / "config.json").write_text("{oops")
    code, err = _grpo(capsys, folder, tmp_path)
    assert code == 1
    line = assert_one_clean_line(err, fragment, str(folder))
    assert "sentencepiece" not in line


@pytest.mark.parametrize("content, fragment", [
    (b"GGUF\x03\x00\x00\x00\x10", "Could not read the GGUF file"),  # a real header, cut off
    (b"<html>404 Not Found</html>", "is not a GGUF file: it starts with b'<htm'"),
    (b"", "is not a GGUF file: it is empty"),
])
def test_truncated_or_garbage_gguf(tmp_path, capsys, content, fragment):
    path = tmp_path / "model.gguf"
    path.write_bytes(content)
    code, err = _grpo(capsys, path, tmp_path)
    assert code == 1
    assert_one_clean_line(err, fragment)


def test_folder_of_gguf_files_without_gguf_file(tmp_path, capsys):
    folder = tmp_path / "ggufs"
    folder.mkdir()
    (folder / "m-q8.gguf").write_bytes(b"GGUF")
    code, err = _grpo(capsys, folder, tmp_path)
    assert code == 1
    assert_one_clean_line(err, "set model.gguf_file", "m-q8.gguf")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_device_on_a_machine_without_one(tmp_path, capsys):
    save_tiny_model(tmp_path / "model")
    code, err = _grpo(capsys, tmp_path / "model", tmp_path, "model.device=cuda:1")
    assert code == 1
    assert_one_clean_line(err, "CUDA is not available")
