"""Progress of a keypoint cache build (minutes on a CPU): a bar on a terminal, log lines otherwise."""
from __future__ import annotations

import logging
import time

__all__ = ["BuildProgress"]


class BuildProgress:
    """``update(n)`` after each batch of ``total`` images. On a terminal: a tqdm bar (rate and time left). Otherwise
    (a log file, a scheduler's output): a line when the build starts and one every ``every_s`` seconds with the
    count, the rate and the time left, through ``log`` (each line once). ``enabled=False``: silent (DDP ranks
    other than 0)."""

    def __init__(self, total: int, desc: str, log: logging.Logger, every_s: float = 60.0, enabled: bool = True) -> None:
        self.total, self.desc, self.log, self.every_s, self.enabled = total, desc, log, every_s, enabled
        self.done, self.t0 = 0, time.perf_counter()
        self._last = self.t0
        self.bar = None
        if enabled and total:
            from tqdm.auto import tqdm

            # disable=None: no bar when stderr is not a terminal (a log file would get every refresh)
            self.bar = tqdm(total=total, desc=desc, unit="img", dynamic_ncols=True, smoothing=0.1, disable=None)
            if self.bar.disable:
                self.bar = None
                log.info("%s: detecting the keypoints of %d images", desc, total)

    def update(self, n: int) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
        elif self.enabled and time.perf_counter() - self._last >= self.every_s:
            self._last = time.perf_counter()
            rate = self.done / max(self._last - self.t0, 1e-9)
            self.log.info("%s: %d of %d images (%.0f img/s, ETA %.0f s)", self.desc, self.done, self.total, rate,
                          (self.total - self.done) / max(rate, 1e-9))

    def close(self) -> float:
        """Seconds since the start."""
        if self.bar is not None:
            self.bar.close()
        return time.perf_counter() - self.t0
