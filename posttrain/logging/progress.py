"""Training progress bar with ETA and the latest key metrics.

Terminal (stderr is a TTY): a tqdm bar, ``37%|####    | 37/100 [01:02<01:46, 1.7s/step,
reward=0.431 acc=0.31]``; :meth:`ProgressBar.write` prints lines above it.

Not a terminal (CI logs, ``> train.log``, notebooks): tqdm's carriage-return
redraws would fill the file with partial lines, so no bar is drawn. Instead one plain line
``[progress] step 37/100 (37%) elapsed 01:02 eta 01:46 | reward=0.431 acc=0.31`` is printed
at most every ``plain_interval_s`` seconds (default 30) and at the last step, and
:meth:`write` is a flushed ``print``. The metric lines the trainer writes every
``logging.console_every`` steps carry the details.

Disabled (``enabled=False``): nothing but :meth:`write`'s plain prints.

:meth:`phase` names what runs now (``generating``, ``training``, ``validating``, ``saving
checkpoint``) after the metrics, so a step of minutes or the validation after the last step shows
what it is doing instead of a bar that stands still (tqdm redraws; plain mode prints a
``[progress]`` line when the interval has passed). Work between steps (validation, checkpoints) is
a paused phase: its time does not count into the step rate, so the ETA is that of the steps.

Every line printed here (the lines of :meth:`write` and the plain ``[progress]`` lines, not the
tqdm bar itself) also goes to the ``posttrain.console`` logger, which the run's train.log
listens to (``log_to_file``): train.log holds what the console shows.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from collections.abc import Iterator, Mapping
from typing import Any, TextIO

from tqdm import tqdm

CONSOLE_LOGGER = "posttrain.console"
# Not propagated: the console already shows these lines (printed), only train.log's handler wants them.
console_log = logging.getLogger(CONSOLE_LOGGER)
console_log.propagate = False
console_log.setLevel(logging.INFO)


class ProgressBar:
    """Progress over training steps; see the module docstring for the non-TTY behaviour.

    ``tty`` forces the mode (None: detect from ``file``, default stderr like tqdm).
    """

    def __init__(self, total: int, initial: int = 0, enabled: bool = True, *, tty: bool | None = None,
                 plain_interval_s: float = 30.0, file: TextIO | None = None) -> None:
        self.total = total
        self.initial = initial
        self.enabled = enabled
        self._file = file if file is not None else sys.stderr
        self._tty = _is_tty(self._file) if tty is None else tty
        self._plain_interval_s = plain_interval_s
        self._step = initial
        self._postfix = ""
        self._phase = ""
        self._paused_s = 0.0  # time in paused phases: not part of any step's time
        self._start = time.monotonic()
        self._last_plain = -float("inf")
        self._last_plain_step: int | None = None
        self._bar: Any = None
        if enabled and self._tty:
            self._bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, file=self._file,
                             smoothing=0.1)  # steps vary (response lengths): mostly average rate

    @property
    def uses_tqdm(self) -> bool:
        """True when a live tqdm bar is drawn (enabled and on a terminal)."""
        return self._bar is not None

    def update(self, step: int, postfix: Mapping[str, Any] | None = None) -> None:
        """Move to ``step`` (absolute, not a delta) and show ``postfix`` as ``key=value``."""
        self._step = step
        if postfix is not None:
            self._postfix = " ".join(f"{key}={_short(value)}" for key, value in postfix.items())
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.set_postfix_str(self._shown_postfix(), refresh=False)
            # update() by the delta keeps tqdm's rate (and so the ETA) right and respects its
            # redraw interval; a step backwards (should not happen) resets the position.
            if step >= self._bar.n:
                self._bar.update(step - self._bar.n)
            else:
                self._bar.n = step
                self._bar.refresh()
            return
        now = time.monotonic()
        if now - self._last_plain >= self._plain_interval_s or step >= self.total:
            self._print_plain(now)

    @contextlib.contextmanager
    def phase(self, label: str, pause: bool = False) -> Iterator[None]:
        """Show ``label`` after the metrics while the block runs. ``pause``: work between steps
        (validation, checkpoints), left out of the step rate and so of the ETA."""
        if not self.enabled:
            yield
            return
        previous, self._phase = self._phase, label
        start = time.monotonic()
        self._show_phase()
        try:
            yield
        finally:
            self._phase = previous
            if pause:
                self._paused_s += time.monotonic() - start
                if self._bar is not None:
                    self._bar.unpause()  # tqdm's rate restarts from now: the pause is not a step's time
            self._show_phase()

    def _shown_postfix(self) -> str:
        return " | ".join(part for part in (self._postfix, self._phase and f"{self._phase}...") if part)

    def _show_phase(self) -> None:
        if self._bar is not None:
            self._bar.set_postfix_str(self._shown_postfix(), refresh=True)
            return
        now = time.monotonic()
        if not self._tty and self._phase and now - self._last_plain >= self._plain_interval_s:
            self._print_plain(now)

    def write(self, line: str) -> None:
        """Print ``line`` above the bar (or plainly without one)."""
        console_log.info(line)
        if self._bar is not None:
            self._bar.write(line)
        else:
            print(line, flush=True)

    def close(self) -> None:
        """Finish the bar; in plain mode print the final position if it was not yet printed."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        elif self.enabled and not self._tty and self._last_plain_step != self._step:
            self._print_plain(time.monotonic())
        self.enabled = False

    def __enter__(self) -> ProgressBar:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _print_plain(self, now: float) -> None:
        elapsed = now - self._start
        done = self._step - self.initial
        percent = 100.0 * self._step / self.total if self.total else 100.0
        line = f"[progress] step {self._step}/{self.total} ({percent:.0f}%) elapsed {tqdm.format_interval(elapsed)}"
        if done > 0 and self._step < self.total:
            # Rate from the steps done in this process (a resumed run gets a fair ETA), without
            # the paused phases between them (validation, checkpoints).
            stepping = max(elapsed - self._paused_s, 0.0)
            line += f" eta {tqdm.format_interval(stepping / done * (self.total - self._step))}"
        shown = self._shown_postfix()
        if shown:
            line += f" | {shown}"
        print(line, flush=True)
        console_log.info(line)
        self._last_plain = now
        self._last_plain_step = self._step


def _short(value: Any) -> str:
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)


def _is_tty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # closed or file-like objects without isatty
        return False
