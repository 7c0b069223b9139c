"""Request schemas of ``posttrain serve`` (the OpenAI-compatible endpoints and ``/generate``), and
the prompt token ids a chat or completion request stands for.

Unknown top-level parameters are rejected (400) rather than silently ignored; fixed ranges are
checked here, server limits (``--max-n``, ``--max-tokens-limit``) where sampling params are built.
"""

from __future__ import annotations

from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, StrictInt

from posttrain.server.protocol import APIError, _Strict


class StreamOptions(_Strict):
    include_usage: bool = False


class _OpenAISampling(_Strict):
    model: Optional[str] = None  # one model per server: any name is accepted
    n: Optional[int] = None
    temperature: Optional[float] = Field(None, ge=0.0, le=2.0)
    top_p: Optional[float] = Field(None, gt=0.0, le=1.0)
    top_k: Optional[int] = Field(None, ge=-1)  # extension, as in vLLM; -1 and 0 switch it off
    max_tokens: Optional[int] = None
    stop: Union[str, list[str], None] = None
    seed: Optional[int] = None
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    user: Optional[str] = None  # accepted and ignored
    # Accepted only at their neutral value, since the engines do not implement them.
    presence_penalty: Optional[float] = Field(None, ge=0.0, le=0.0)
    frequency_penalty: Optional[float] = Field(None, ge=0.0, le=0.0)


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)  # e.g. tool_calls on assistant messages
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Union[str, list[TextPart], None] = None
    name: Optional[str] = None


class ChatCompletionRequest(_OpenAISampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Optional[int] = None
    logprobs: Optional[bool] = None
    top_logprobs: Optional[int] = None


class CompletionRequest(_OpenAISampling):
    prompt: Union[str, list[str], list[StrictInt], list[list[StrictInt]]]
    logprobs: Optional[int] = Field(None, ge=0, le=5)
    echo: bool = False
    best_of: Optional[int] = None
    suffix: Optional[str] = None


class GenerateSampling(_Strict):
    n: int = 1
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=-1)
    max_new_tokens: Optional[int] = None
    max_tokens: Optional[int] = None  # alias of max_new_tokens
    stop: Union[str, list[str], None] = None
    seed: Optional[int] = None
    logprobs: bool = True


class GenerateRequest(_Strict):
    input_ids: list[StrictInt] = Field(min_length=1)
    sampling_params: GenerateSampling = Field(default_factory=GenerateSampling)


def message_text(message: ChatMessage) -> str:
    if message.content is None:
        return ""
    if isinstance(message.content, str):
        return message.content
    return "".join(part.text for part in message.content)


def chat_prompt_ids(tokenizer: Any, messages: list[ChatMessage]) -> list[int]:
    if not getattr(tokenizer, "chat_template", None):
        raise APIError(400, "This model's tokenizer has no chat template; use /v1/completions with a text prompt.",
                       param="messages", code="unsupported_endpoint")
    rendered = [{"role": "system" if m.role == "developer" else m.role, "content": message_text(m)} for m in messages]
    try:
        text = tokenizer.apply_chat_template(rendered, tokenize=False, add_generation_prompt=True)
    except Exception as exc:  # the template itself may reject a conversation (e.g. role order)
        raise APIError(400, f"The chat template rejected these messages: {exc}", param="messages",
                       code="invalid_value") from None
    # The chat template already holds any BOS token; adding special tokens again would double it.
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def completion_prompt_ids(tokenizer: Any, prompt: Any) -> list[list[int]]:
    if isinstance(prompt, str):
        prompt = [prompt]
    if not prompt:
        raise APIError(400, "Invalid value for 'prompt': the list is empty.", param="prompt", code="invalid_value")
    if all(isinstance(p, int) for p in prompt):  # one prompt given as token ids
        return [list(prompt)]
    if all(isinstance(p, list) for p in prompt):  # several prompts given as token ids
        return [list(p) for p in prompt]
    return [list(ids) for ids in tokenizer(list(prompt), add_special_tokens=True)["input_ids"]]
