"""A one-line progress bar on stderr, for long work (the command line, the examples)."""

import sys


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
