"""The output processor: token ids -> streamed text, stop strings, finish reason.

Streams all but the last (longest stop - 1) characters, which might start a stop string.
vLLM: ``vllm/v1/engine/output_processor.py`` with ``detokenizer.py`` (docs/architecture.md).
"""
from __future__ import annotations

from minfer.tokenizer import IncrementalDetokenizer


class TextOutput:
    """The text of one output sequence as it grows (``text``), and what to stream of it.

    ``add(tok)`` returns the new text that is safe to stream and whether a stop
    string ended the sequence; ``finish()`` returns what was held back. A token
    that ends the sequence by itself (EOS, a stop token id) adds no text.
    """

    def __init__(self, tokenizer, stop: list[str] = ()):
        self.detok = IncrementalDetokenizer(tokenizer) if tokenizer is not None else None
        self.stop = list(stop)
        self.hold = max((len(s) for s in self.stop), default=1) - 1   # could be the start of a stop string
        self.text = ""
        self.emitted = 0                          # characters already streamed
        self.cut = False                          # a stop string ended the text

    def add(self, tok: int, stop_token: bool = False) -> tuple[str, bool]:
        """One new token -> (text safe to stream now, True if a stop string was found)."""
        if self.detok is None:
            return "", False
        if not stop_token:
            self.text += self.detok.add(tok)
        if self._cut_at_stop():
            return self.finish(), True
        safe = max(self.emitted, len(self.text) - self.hold)
        new, self.emitted = self.text[self.emitted:safe], safe
        return new, False

    def finish(self) -> str:
        """The sequence ended: flush the detokenizer (unless a stop string cut it) and release held text."""
        if self.detok is not None and not self.cut:
            self.text += self.detok.flush()
            self._cut_at_stop()
        new, self.emitted = self.text[self.emitted:], len(self.text)
        return new

    def _cut_at_stop(self) -> bool:
        hits = [self.text.find(s) for s in self.stop if s in self.text]
        if hits:
            self.text, self.cut = self.text[:min(hits)], True
        return bool(hits)
