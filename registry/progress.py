"""Progress of blob downloads for people at a command line: a bar per blob on a terminal
(tqdm), a plain line at each quarter when the output is a file or a pipe (logs, CI)."""

from __future__ import annotations

from typing import TextIO

from tqdm import tqdm

from registry.digests import Digest


class Progress:
    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.tty = out.isatty()
        self.bars: dict[str, tqdm] = {}
        self.quarters: dict[str, int] = {}

    def __call__(self, label: str, digest: Digest, done: int, size: int) -> None:
        key = f"{label} {digest}"
        name = f"{label} {str(digest)[7:19]}"
        if self.tty:
            bar = self.bars.get(key)
            if bar is None:
                bar = self.bars[key] = tqdm(
                    total=size, desc=name, unit="B", unit_scale=True, unit_divisor=1024,
                    file=self.out, leave=True,
                )  # fmt: skip
            bar.update(done - bar.n)
            if done >= size:
                bar.close()
            return
        quarter = 4 * done // size if size else 4
        if quarter > self.quarters.get(key, 0):
            self.quarters[key] = quarter
            print(f"{name}: {25 * quarter}% of {size / 2**20:.1f} MiB", file=self.out, flush=True)

    def close(self) -> None:
        for bar in self.bars.values():
            bar.close()
