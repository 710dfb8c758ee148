"""Conversation state: the turns so far, and trimming them to fit the context."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field


@dataclass
class Turn:
    message: str  # what the person typed
    sentiment: str  # the label detected for it
    user_content: str  # the user turn as the model saw it (message wrapped by the chat prompt)
    reply: str  # the assistant's reply (partial if it was interrupted)
    # Every role's result for the message: role name -> {"label", "probability"}.
    annotations: dict[str, dict] = field(default_factory=dict)


@dataclass
class Conversation:
    turns: list[Turn] = field(default_factory=list)

    def reset(self) -> None:
        self.turns.clear()


def fit_turns(
    turns: Sequence[Turn], count_tokens: Callable[[Sequence[Turn]], int], budget: int, *, slack: float = 0.25
) -> int:
    """How many of the oldest turns to drop so that `count_tokens(kept) <= budget`.

    When trimming is needed we drop until the history fills at most (1 - slack) of the room left
    for it (the budget minus what no trimming removes: system prompt, examples, new message), not
    just until it fits: dropping the oldest turn shifts every later token, which invalidates the
    prefix cache, so one bigger cut followed by several cache-friendly turns beats a cut on every
    turn.
    """
    if count_tokens(turns) <= budget:
        return 0
    fixed = count_tokens(turns[len(turns) :])
    target = fixed + int((budget - fixed) * (1 - slack))
    for drop in range(1, len(turns) + 1):
        if count_tokens(turns[drop:]) <= target:
            return drop
    return len(turns)
