"""Each arm's log: the library's output shown on the console and kept, plain, in ``OUT/logs``.

A library call that crashes costs its arm, not the whole reproduction: :func:`logged` writes
the traceback to the arm's log and turns the crash into a :class:`ReproduceError`.
"""

from __future__ import annotations

import contextlib
import io
import re
import sys
import traceback
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from fedspine.experiments.budgets import ReproduceError
from fedspine.formatting import num

_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b\][^\x07]*\x07|\r")


@contextlib.contextmanager
def logged(log_path: Path, title: str, what: str) -> Iterator[None]:
    """Run a library call with its output shown and appended to ``log_path``.

    A crash costs this arm, not the whole reproduction: it is logged with its traceback and
    becomes a ReproduceError; Ctrl-C goes through.
    """
    tail: deque[str] = deque(maxlen=40)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "a", encoding="utf-8") as log:
        log.write(f"\n$ {title}\n")
        log.flush()
        out_tee = _Tee(sys.stdout, log, tail)
        err_tee = _Tee(sys.stderr, log, tail)
        with contextlib.redirect_stdout(out_tee), contextlib.redirect_stderr(err_tee):
            try:
                yield
            except (ReproduceError, KeyboardInterrupt):
                raise
            except Exception as err:
                log.write(traceback.format_exc())
                raise ReproduceError(f"{what} failed: {type(err).__name__}: {err}") from None


def strip_ansi(text: str) -> str:
    """``text`` without terminal colour codes and carriage returns, as a log keeps it."""
    return _ANSI.sub("", text)


class _Tee(io.TextIOBase):
    """A text stream that writes to the console and, without terminal codes, to a log."""

    def __init__(self, console: Any, log: Any, tail: deque[str]) -> None:
        self._console, self._log, self._tail = console, log, tail

    def write(self, text: str) -> int:
        self._console.write(text)
        plain = strip_ansi(text)
        self._log.write(plain)
        self._tail.extend(line for line in plain.splitlines() if line.strip())
        return len(text)

    def flush(self) -> None:
        self._console.flush()
        self._log.flush()

    def isatty(self) -> bool:
        return bool(getattr(self._console, "isatty", lambda: False)())

    @property
    def encoding(self) -> str:
        return getattr(self._console, "encoding", None) or "utf-8"


class PlainReporter:
    """A training run's lines and a tick line per tick, as plain text for the arm's log."""

    def message(self, text: str) -> None:
        print(text)

    def start(self, total_kimg: float, done_kimg: float, ada_p: float, private: bool) -> None:
        print(f"training from {done_kimg:.3f} to {total_kimg:g} kimg")

    def step(self, kimg: float) -> None:
        pass

    def tick(self, record: dict[str, Any], private: bool) -> None:
        spk = record.get("sec_per_kimg")
        print(
            f"kimg {record['cur_nimg'] / 1000:.3f}  loss G {record['loss_g']:.3f}  "
            f"p {record['ada_p']:.3f}" + (f"  {spk:.1f} s/kimg" if spk else "")
        )

    def stop(self) -> None:
        pass


class PlainClassifierReporter:
    """A classifier run's lines and one line per epoch, as plain text for the arm's log."""

    def message(self, text: str) -> None:
        print(text)

    def event(self, event: dict[str, Any]) -> None:
        if event["event"] == "epoch":
            print(
                f"epoch {event['epoch']:3d}  train loss {event['train_loss']:.4f}  val AUC "
                + num(event["val_auc"])
            )

    def dp_start(self, steps: int) -> None:
        print(f"DP training: {steps} steps")

    def dp_step(self, step: int) -> None:
        pass
