"""Request and response bodies. Requests are validated strictly (no "5" for 5, no "yes" for
true); our own endpoints reject unknown fields, the OpenAI-compatible one ignores them as the
OpenAI API's many optional fields are allowed but unused here."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

SESSION_ID_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"


def _valid_unicode(value: str) -> str:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as err:
        raise ValueError(
            f"not valid Unicode: a lone surrogate (\\u{ord(value[err.start]):04x}) at character {err.start}"
        ) from None
    return value


# A string that can be encoded (JSON escapes like "\ud800" decode to lone surrogates, which can't).
Text = Annotated[str, AfterValidator(_valid_unicode)]


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")


class ErrorBody(BaseModel):
    message: str
    type: str


class ErrorResponse(BaseModel):
    error: ErrorBody


# ---- sentiment ---------------------------------------------------------------------------------


class TextsRequest(_Strict):
    """`text` or `texts`: what /v1/sentiment and /v1/analyze answer for."""

    text: Text | None = Field(None, description="One text.")
    texts: list[Text] | None = Field(None, description="Several texts (instead of `text`).")

    @model_validator(mode="after")
    def _one_of(self):
        if (self.text is None) == (self.texts is None):
            raise ValueError("give exactly one of `text` or `texts`")
        if self.texts is not None and not self.texts:
            raise ValueError("`texts` must not be empty")
        return self


class SentimentRequest(TextsRequest):
    pass


class SentimentResult(BaseModel):
    label: str = Field(description="One of the role's labels (sentiment: positive or negative).")
    probability: float | None = Field(description="Probability of `label`.")
    latency_ms: float
    truncated: bool = Field(False, description="The text was too long; its middle was left out.")
    emoji: str
    display: str = Field(description='What the page shows, e.g. "😄 LLM 情感判断: 正面".')


class SentimentBatchResponse(BaseModel):
    results: list[SentimentResult]


# ---- analyze (several roles) ------------------------------------------------------------------


class AnalyzeRequest(TextsRequest):
    roles: list[str | dict] = Field(
        description="Choice and extract roles to answer: names (GET /v1/roles lists them), or choice role "
        "definitions inline (the schema of a role file; zero-shot, at most 50 labels and 64 kB).",
        min_length=1,
        max_length=16,
    )


class RoleResult(SentimentResult):
    probabilities: dict[str, float] = Field(description="Every label's probability.")


class PhrasesResult(BaseModel):
    phrases: list[str] = Field(description="Key phrases taken literally from the text, best first.")
    scores: list[float] = Field(description="Each phrase's score (higher: more likely a key phrase).")
    latency_ms: float
    truncated: bool = Field(False, description="The text was too long; its middle was left out.")
    display: str = Field(description='What the page shows, e.g. "🔑 关键词: 驾照 · 考试".')


class AnalyzeResult(BaseModel):
    roles: dict[str, RoleResult | PhrasesResult] = Field(
        description="Role name -> its answer, in the order asked: a choice role's label, an extract role's phrases."
    )


class AnalyzeBatchResponse(BaseModel):
    results: list[AnalyzeResult]


class RoleInfo(BaseModel):
    name: str
    kind: str
    description: str
    labels: list[dict] = Field(description="name, description, display, emoji; choice roles only.")
    head: bool | None = Field(
        description="Answered by a learned head on the shared pass (choice and extract roles; chat: null)."
    )


class RolesResponse(BaseModel):
    roles: list[RoleInfo]


# ---- respond -----------------------------------------------------------------------------------


class RespondRequest(_Strict):
    message: Text
    session_id: str | None = Field(
        None, pattern=SESSION_ID_PATTERN, description="Continue this conversation (created if new); omitted: a new one."
    )
    stream: bool = Field(False, description="Server-Sent Events: `sentiment`, then `delta`s, then `done`.")
    max_tokens: int | None = Field(None, ge=1, description="Reply length cap (at most the server's reply_max_tokens).")
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    seed: int | None = None


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    cached_tokens: int = 0


class Timings(BaseModel):
    time_to_first_token_ms: float | None
    total_ms: float


class MessageAnnotations(BaseModel):
    roles: dict[str, SentimentResult] = Field(description="Each role of `chat_roles` (emotion, intent): its answer.")
    display: str = Field(description="The line the page shows under the message, e.g. `😢 悲伤 · 倾诉`.")


class RespondDone(BaseModel):
    session_id: str
    annotations: MessageAnnotations = Field(
        description="The message's other roles (setting chat_roles), computed once the reply has begun; "
        "streamed as an `annotations` event too."
    )
    finish_reason: str
    usage: Usage
    timings: Timings
    dropped_turns: int
    turns: int = Field(description="Turns stored in the session after this one.")


class RespondResponse(RespondDone):
    sentiment: SentimentResult
    reply: str


class Annotation(BaseModel):
    label: str
    probability: float | None


class SessionTurn(BaseModel):
    seq: int = Field(description="The turn's number in its session: consecutive, whichever replica stored it.")
    message: str
    sentiment: str = Field(description="The chat role's mood label for the message (`display`, `emoji`: as shown).")
    probability: float | None
    emoji: str
    display: str
    reply: str
    annotations: dict[str, Annotation] = Field(description="Every role's result for the message, by role name.")
    annotations_display: str = Field(description="The other roles as the page shows them: `😢 悲伤 · 倾诉`.")


class SessionResponse(BaseModel):
    session_id: str
    turns: list[SessionTurn]


# ---- OpenAI-compatible chat completions ----------------------------------------------------------


class _Lenient(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class ContentPart(_Lenient):
    type: Literal["text"]
    text: Text


class ChatMessage(_Lenient):
    role: Literal["system", "developer", "user", "assistant"]
    content: Text | list[ContentPart]

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class StreamOptions(_Lenient):
    include_usage: bool = False


class ChatCompletionRequest(_Lenient):
    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    stop: Text | list[Text] | None = None
    n: int | None = Field(None, ge=1, le=1, description="Only 1 is supported.")
    seed: int | None = None

    @model_validator(mode="after")
    def _stop_list(self):
        if isinstance(self.stop, list) and len(self.stop) > 4:
            raise ValueError("`stop` takes at most 4 strings")
        return self

    def stop_strings(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class Choice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: str


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: Usage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "allinone"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
