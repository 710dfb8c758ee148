"""From generated token ids to text deltas: incremental UTF-8 and stop strings.

A Chinese character is often split over two byte-level tokens, and a stop string can arrive
split over several tokens; so text is released only once it is whole and cannot be the start of
a stop string.
"""

from __future__ import annotations

import codecs
from collections.abc import Iterator, Sequence

from .base import Generation


class TextStream:
    def __init__(self, token_bytes, generation: Generation, stop: Sequence[str] = ()):
        self._token_bytes = token_bytes
        self._generation = generation
        self._stop = [s for s in stop if s]
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.text = ""  # everything released so far
        self.tokens: list[int] = []
        self.finish_reason: str | None = None

    def __iter__(self) -> Iterator[str]:
        pending = ""
        try:
            for token in self._generation:
                self.tokens.append(token)
                pending += self._decoder.decode(self._token_bytes(token))
                cut = self._find_stop(pending)
                if cut is not None:
                    pending = pending[:cut]
                    self.finish_reason = "stop"
                    break
                safe = len(pending) - self._held_back(pending)
                if safe > 0:
                    delta, pending = pending[:safe], pending[safe:]
                    self.text += delta
                    yield delta
            else:
                pending += self._decoder.decode(b"", final=True)
                self.finish_reason = self._generation.finish_reason
        finally:
            # Runs on a normal end, a stop string, or when the consumer abandons us: in every case
            # the model stops generating now.
            self._generation.close()
            if self.finish_reason is None:
                self.finish_reason = "cancelled"
        if pending:
            self.text += pending
            yield pending

    def _find_stop(self, text: str) -> int | None:
        hits = [i for i in (text.find(s) for s in self._stop) if i >= 0]
        return min(hits) if hits else None

    def _held_back(self, text: str) -> int:
        """Length of the longest tail of `text` that could still grow into a stop string."""
        longest = 0
        for s in self._stop:
            for n in range(min(len(s) - 1, len(text)), longest, -1):
                if text.endswith(s[:n]):
                    longest = n
                    break
        return longest
