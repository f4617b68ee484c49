"""The output processor: token ids -> streamed text, stop strings, finish reason.

Streams all but the last (longest stop - 1) characters, which might start a stop string.
vLLM: ``vllm/v1/engine/output_processor.py`` with ``detokenizer.py`` (docs/architecture.md).
"""
from typing import Sequence

from minfer.tokenizer import IncrementalDetokenizer


def stream_cut(text: str, emitted: int, stop: Sequence[str], final: bool) -> tuple[str, str, bool]:
    """-> (text cut before its earliest stop string, the new text safe to stream, whether one was found).
    Held back: the last (longest stop - 1) characters, unless cut or ``final``. vLLM: ``StopChecker``."""
    hits = [text.find(s) for s in stop if s in text]
    if hits:
        text = text[:min(hits)]
    hold = max((len(s) for s in stop), default=1) - 1
    safe = len(text) if hits or final else max(emitted, len(text) - hold)
    return text, text[emitted:safe], bool(hits)


class TextOutput:
    """The text of one output sequence as it grows, and what to stream of it: ``add(tok)`` -> (safe new
    text, stop string found?); ``finish()`` -> what was held back. EOS or a stop token id adds no text."""

    def __init__(self, tokenizer, stop: list[str] = ()):
        self.detok = IncrementalDetokenizer(tokenizer) if tokenizer is not None else None
        self.stop = list(stop)
        self.text = ""
        self.emitted = 0                          # characters already streamed
        self.cut = False                          # a stop string ended the text

    def add(self, tok: int, stop_token: bool = False) -> tuple[str, bool]:
        """One new token -> (text safe to stream now, True if a stop string was found)."""
        if self.detok is None:
            return "", False
        if not stop_token:
            self.text += self.detok.add(tok)
        return self._advance(final=False)

    def finish(self) -> str:
        """The sequence ended: flush the detokenizer (unless a stop string cut it) and release held text."""
        if self.detok is not None and not self.cut:
            self.text += self.detok.flush()
        return self._advance(final=True)[0]

    def _advance(self, final: bool) -> tuple[str, bool]:
        self.text, new, stopped = stream_cut(self.text, self.emitted, self.stop, final)
        self.cut, self.emitted = self.cut or stopped, self.emitted + len(new)
        return new, stopped
