"""Progress output of the demos that stays small in logs: bars on a terminal, lines elsewhere.

On a terminal a tqdm bar redraws in place. Redirected to a file or a CI log, the same bar would
append a carriage-return update every 0.1 s (a ``make demo > log`` grew to 180 KB that way), so
there each bar prints nothing while it runs and one line when it closes (``desc: summary``), plus
one line per :meth:`Bar.epoch` call. ``"off"`` (``--quiet``) prints nothing at all.
"""

import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, TextIO

__all__ = ["MODES", "Bar", "Progress"]

MODES = ("bar", "lines", "off")


class Bar:
    """One progress bar: a tqdm bar (mode ``"bar"``) or a few plain lines (mode ``"lines"``).

    Args:
        total: Number of steps.
        desc: Label printed in front of the bar or line.
        mode: One of :data:`MODES`.
        stream: Where to write.
        unit: Name of one step (tqdm's ``unit``).
    """

    def __init__(self, total: int, desc: str, mode: str, stream: TextIO, unit: str) -> None:
        self.desc = desc
        self.mode = mode
        self.stream = stream
        self._tqdm: Any = None
        self._start = time.perf_counter()
        self._summary = ""
        if mode == "bar":
            from tqdm.auto import tqdm  # optional dependency: the [demo] extra

            self._tqdm = tqdm(total=total, desc=desc, unit=unit, file=stream, leave=True)

    def update(self, steps: int = 1) -> None:
        """Advance by ``steps`` (redraws only in mode ``"bar"``)."""
        if self._tqdm is not None:
            self._tqdm.update(steps)

    def epoch(self, message: str) -> None:
        """Report the end of an epoch: the bar's postfix, or one line in mode ``"lines"``."""
        self._summary = message
        if self._tqdm is not None:
            self._tqdm.set_postfix_str(message, refresh=False)
        elif self.mode == "lines":
            print(f"{self.desc}: {message}", file=self.stream, flush=True)

    def close(self) -> None:
        """Close the bar; in mode ``"lines"`` print one closing line with the elapsed time."""
        if self._tqdm is not None:
            self._tqdm.close()
        elif self.mode == "lines":
            seconds = time.perf_counter() - self._start
            print(f"{self.desc}: done in {seconds:.1f} s", file=self.stream, flush=True)


class Progress:
    """Where and how the demos report progress.

    Args:
        mode: ``"bar"`` (tqdm), ``"lines"`` (one line per epoch and per finished bar) or
            ``"off"``; ``None`` picks ``"bar"`` when ``stream`` is a terminal, else ``"lines"``.
        stream: Where progress goes (default: ``sys.stderr``).

    Raises:
        ValueError: Unknown ``mode``.
    """

    def __init__(self, mode: str | None = None, stream: TextIO | None = None) -> None:
        self.stream = sys.stderr if stream is None else stream
        if mode is None:
            isatty = getattr(self.stream, "isatty", None)
            mode = "bar" if isatty is not None and isatty() else "lines"
        if mode not in MODES:
            raise ValueError(f"`mode` must be one of {list(MODES)}, got {mode!r}.")
        self.mode = mode

    @property
    def enabled(self) -> bool:
        """Whether anything is printed."""
        return self.mode != "off"

    @contextmanager
    def bar(self, total: int, desc: str, unit: str = "step") -> Iterator[Bar]:
        """A :class:`Bar` that is closed on exit (also on exceptions)."""
        bar = Bar(total, desc, self.mode, self.stream, unit)
        try:
            yield bar
        finally:
            bar.close()

    def line(self, message: str) -> None:
        """Print one progress line (nothing in mode ``"off"``)."""
        if self.enabled:
            print(message, file=self.stream, flush=True)
