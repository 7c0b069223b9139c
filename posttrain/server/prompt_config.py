"""Prompt templates of the prompt proxy: a system prompt, few-shot examples and an answer format,
read from YAML (a preset in posttrain/server/prompts/ or a file path).

    system_prompt: "You are a careful math assistant."
    few_shot:                       # user/assistant turns placed before the conversation
      - question: "What is 7 * 8?"
        answer: "7 * 8 = 56. The answer is \\boxed{56}."
    answer_format: "Put the final answer in \\boxed{}."
    user_template: "{question}\\n\\n{answer_format}"   # how a question becomes the user turn

Placeholders are replaced literally (not with ``str.format``), so braces such as ``\\boxed{}`` need
no escaping.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from posttrain.errors import ConfigError

PRESETS_DIR = Path(__file__).parent / "prompts"
DEFAULT_USER_TEMPLATE = "{question}\n\n{answer_format}"


@dataclass
class PromptConfig:
    name: str = ""
    system_prompt: str = ""
    few_shot: list[dict[str, str]] = field(default_factory=list)  # each {"question": ..., "answer": ...}
    answer_format: str = ""
    user_template: str = DEFAULT_USER_TEMPLATE

    def user_turn(self, question: str) -> str:
        """The user message for ``question``: the template with its placeholders filled in."""
        text = self.user_template.replace("{answer_format}", self.answer_format).replace("{question}", question)
        return text.strip()

    def chat_messages(self, messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """``messages`` with the template applied: the system prompt (unless the conversation has
        one), the few-shot turns after the system messages, and the last user turn templated."""
        last_user = max((i for i, m in enumerate(messages) if m.get("role") == "user"), default=None)
        out = [dict(m) for m in messages]
        if last_user is not None and isinstance(out[last_user].get("content"), str):
            out[last_user]["content"] = self.user_turn(out[last_user]["content"])
        num_system = next((i for i, m in enumerate(out) if m.get("role") not in ("system", "developer")), len(out))
        shots = [turn for ex in self.few_shot for turn in (
            {"role": "user", "content": self.user_turn(ex["question"])}, {"role": "assistant", "content": ex["answer"]})]
        out[num_system:num_system] = shots
        if self.system_prompt and num_system == 0:
            out.insert(0, {"role": "system", "content": self.system_prompt})
        return out

    def text_prompt(self, prompt: str) -> str:
        """A plain-text prompt (``/v1/completions``): system prompt, examples as Q/A, the question."""
        parts = [self.system_prompt] if self.system_prompt else []
        parts += [f"{self.user_turn(ex['question'])}\n{ex['answer']}" for ex in self.few_shot]
        parts.append(self.user_turn(prompt))
        return "\n\n".join(parts)


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))


def _is_explicit_path(name_or_path: str) -> bool:
    """``./math``, ``dir/math``, ``~/math`` and ``math.yaml`` name files; a bare ``math`` names a preset."""
    return "/" in name_or_path or "\\" in name_or_path or name_or_path.startswith("~") or bool(Path(name_or_path).suffix)


def load_prompt_config(name_or_path: str) -> PromptConfig:
    """A preset name (``math``, ``gsm8k``, ``plain``) or the path of a YAML file. A bare name is
    the preset even when a file or folder of that name is in the working directory (a folder
    named ``math`` is common); write ``./math`` to mean the file."""
    path = Path(name_or_path).expanduser()
    if not _is_explicit_path(name_or_path) and name_or_path in preset_names():
        path = PRESETS_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        what = "a folder, not a YAML file" if path.is_dir() else "neither a preset nor a YAML file"
        raise ConfigError(f"--prompt-config '{name_or_path}' is {what}; give one of the presets "
                          f"({', '.join(preset_names())}) or the path of a YAML file (see docs/server.md).")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"--prompt-config {path}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"--prompt-config {path}: expected a mapping of keys, got {type(data).__name__}.")
    known = {f.name for f in fields(PromptConfig)} - {"name"}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"--prompt-config {path}: unknown key(s) {unknown}; the keys are {sorted(known)}.")
    for key in ("system_prompt", "answer_format", "user_template"):
        if not isinstance(data.get(key, ""), str):
            raise ConfigError(f"--prompt-config {path}: '{key}' must be a string.")
    shots = data.get("few_shot") or []
    if not isinstance(shots, list) or not all(
            isinstance(s, dict) and set(s) == {"question", "answer"} and all(isinstance(v, str) for v in s.values())
            for s in shots):
        raise ConfigError(f"--prompt-config {path}: 'few_shot' must be a list of {{question: str, answer: str}} "
                          "entries.")
    template = data.get("user_template", DEFAULT_USER_TEMPLATE)
    if "{question}" not in template:
        raise ConfigError(f"--prompt-config {path}: 'user_template' must contain {{question}}, got {template!r}.")
    return PromptConfig(name=path.stem, system_prompt=data.get("system_prompt", ""), few_shot=shots,
                        answer_format=data.get("answer_format", ""), user_template=template)
