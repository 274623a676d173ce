"""Progress of long work on stderr: a one-line bar (the command line, the examples) and the stages
of work whose steps are not known in advance (the budget planner)."""

import sys
import time


class Progress:
    """A one-line progress bar on stderr."""

    def __init__(self, total: int, enabled: bool = True, width: int = 30):
        self.total, self.n, self.enabled, self.width = total, 0, enabled, width

    def step(self, what: str) -> None:
        self.n += 1
        if self.enabled:
            filled = self.width * (self.n - 1) // self.total
            sys.stderr.write(f"\r[{'#' * filled}{'.' * (self.width - filled)}] {self.n}/{self.total} {what:<32}")
            sys.stderr.flush()

    def done(self) -> None:
        if self.enabled:
            sys.stderr.write(f"\r[{'#' * self.width}] {self.total}/{self.total} done{' ' * 30}\n")
            sys.stderr.flush()


class Stages:
    """The stages of long work as they happen (the budget planner's probes, conversions and
    joins), each with the seconds since it began: ``progress`` is False (silent), True (a line
    each on stderr) or a callable given each line."""

    def __init__(self, progress, what: str = "revpass"):
        self.progress, self.what, self.start = progress, what, time.perf_counter()

    def __call__(self, stage: str) -> None:
        if not self.progress:
            return
        line = f"{self.what} [{time.perf_counter() - self.start:6.1f} s] {stage}"
        if callable(self.progress):
            self.progress(line)
        else:
            sys.stderr.write(line + "\n")
            sys.stderr.flush()
