"""OpenAI-compatible request bodies (pydantic) and the one error body every 4xx/5xx response carries.

Requests validate strictly (no "2" -> 2 coercion, no bool as an int), so a wrong type is a 400 naming the field
instead of a silently different request. Unknown fields are ignored, as OpenAI's server does for most of them;
fields we know but cannot honour (n > 1, logprobs, echo, ...) are rejected by `phds_jax.serve.app` with a 400.
The PHDS extras are `k` and `latency_budget_ms`, which the `openai` client sends via `extra_body`.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

# Prompt forms of /v1/completions: one string, several strings, one token-id list, several token-id lists.
Prompt = str | list[str] | list[int] | list[list[int]]


class _Request(BaseModel):
  model_config = ConfigDict(strict=True, extra="ignore")


class StreamOptions(_Request):
  include_usage: bool = False


class SamplingFields(_Request):
  """Fields shared by both endpoints; `k` / `latency_budget_ms` choose the top-k level that serves the request."""

  model: str | None = None
  max_tokens: int | None = Field(default=None, ge=1)
  temperature: float = Field(default=1.0, ge=0.0, le=2.0)
  top_p: float = Field(default=1.0, gt=0.0, le=1.0)
  top_k: int = Field(default=0, ge=0)  # vLLM's extra field; 0 = off
  seed: int | None = None  # range checked by SamplingParams.validate ([0, 2**31))
  stop: str | list[str] | None = None
  n: int = 1
  stream: bool = False
  stream_options: StreamOptions | None = None
  user: str | None = None
  # PHDS extras (and vLLM's return_token_ids: the generated ids beside the text).
  k: int | None = None
  latency_budget_ms: float | None = Field(default=None, gt=0.0)
  return_token_ids: bool = False
  # Known OpenAI fields we do not implement: rejected (400) when set to anything but their neutral value.
  logprobs: Any = None
  presence_penalty: float = 0.0
  frequency_penalty: float = 0.0
  logit_bias: dict[str, float] | None = None


class CompletionRequest(SamplingFields):
  prompt: Prompt
  echo: bool = False
  suffix: str | None = None
  best_of: int | None = None


class ContentPart(_Request):
  type: Literal["text"]
  text: str


class ChatMessage(_Request):
  role: str
  content: str | list[ContentPart] | None = None
  name: str | None = None

  def text(self) -> str:
    if self.content is None:
      return ""
    if isinstance(self.content, str):
      return self.content
    return "".join(part.text for part in self.content)


class ChatCompletionRequest(SamplingFields):
  messages: list[ChatMessage] = Field(min_length=1)
  max_completion_tokens: int | None = Field(default=None, ge=1)  # the newer name of max_tokens
  top_logprobs: int | None = None


# ------------------------------------------------------------------------------------------------- errors


class APIError(Exception):
  """An error returned to the client as OpenAI's body: {"error": {message, type, param, code}}."""

  def __init__(self, status: int, message: str, param: str | None = None,
               type_: str = "invalid_request_error", code: str | None = None,
               headers: dict[str, str] | None = None):
    super().__init__(message)
    self.status, self.message, self.param, self.type, self.code = status, message, param, type_, code
    self.headers = headers or {}

  def body(self) -> dict[str, Any]:
    return error_body(self.message, self.param, self.type, self.code)


def error_body(message: str, param: str | None = None, type_: str = "invalid_request_error",
               code: str | None = None) -> dict[str, Any]:
  return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def invalid(param: str | None, message: str) -> APIError:
  """A 400 naming `param`."""
  return APIError(400, message, param)
