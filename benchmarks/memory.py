"""Peak memory: this process's RSS (CPU), torch's allocator (CUDA), or another process's RSS by sampling.

Linux keeps a per-process RSS high-water mark (``VmHWM``) that ``/proc/self/clear_refs`` can reset,
so a phase's own peak is measurable without a sampling thread. Elsewhere we fall back to
``ru_maxrss``, which is the peak since the process started (documented by ``PeakMemory.exact``).
"""

from __future__ import annotations

import resource
import sys
import threading
from pathlib import Path

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def _status_kib(field: str, status: Path = _STATUS) -> int | None:
    try:
        for line in status.read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])  # "VmHWM:   13536 kB"
    except OSError:
        return None
    return None


def reset_peak_rss() -> bool:
    """Reset this process's RSS high-water mark; False where the OS does not allow it."""
    try:
        _CLEAR_REFS.write_text("5")  # 5: reset the peak RSS (Linux >= 4.0)
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int:
    """This process's peak RSS since start or since the last successful :func:`reset_peak_rss`."""
    kib = _status_kib("VmHWM")
    if kib is not None:
        return kib * 1024
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB on Linux


def current_rss_bytes() -> int:
    kib = _status_kib("VmRSS")
    if kib is not None:
        return kib * 1024
    import psutil

    return psutil.Process().memory_info().rss


def cuda_peak_bytes(device=None) -> int | None:
    """``torch.cuda.max_memory_allocated`` where CUDA is in use, else None (imports torch lazily)."""
    if "torch" not in sys.modules:
        return None
    import torch

    if not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return None
    return int(torch.cuda.max_memory_allocated(device))


class PeakMemory:
    """Context manager: the peak RSS (and CUDA allocation) of the code inside it.

    ``exact`` is False where the RSS peak could not be reset, so ``rss_peak_bytes`` may include
    whatever ran before (model loading, an earlier benchmark).
    """

    def __init__(self) -> None:
        self.exact = False
        self.rss_start_bytes = 0
        self.rss_peak_bytes = 0
        self.cuda_peak_bytes: int | None = None

    def __enter__(self) -> "PeakMemory":
        self.exact = reset_peak_rss()
        self.rss_start_bytes = current_rss_bytes()
        if "torch" in sys.modules:
            import torch

            if torch.cuda.is_available() and torch.cuda.is_initialized():
                torch.cuda.reset_peak_memory_stats()
        return self

    def __exit__(self, *exc) -> None:
        self.rss_peak_bytes = peak_rss_bytes()
        self.cuda_peak_bytes = cuda_peak_bytes()


class ProcessRssSampler:
    """Samples another process's RSS (with its children) in a thread; ``peak_bytes`` is the maximum seen.

    Used for a server under load: its own high-water mark would include start-up, sampling gives the
    peak during the benchmark (to within one ``interval_s``).
    """

    def __init__(self, pid: int, interval_s: float = 0.05, include_children: bool = True) -> None:
        import psutil

        self._proc = psutil.Process(pid)
        self.interval_s = interval_s
        self.include_children = include_children
        self.start_bytes = 0
        self.peak_bytes = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _rss(self) -> int:
        import psutil

        procs = [self._proc]
        if self.include_children:
            try:
                procs += self._proc.children(recursive=True)
            except psutil.Error:
                pass
        total = 0
        for p in procs:
            try:
                total += p.memory_info().rss
            except psutil.Error:  # a child exited between listing and reading
                pass
        return total

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak_bytes = max(self.peak_bytes, self._rss())
            self.samples += 1
            self._stop.wait(self.interval_s)

    def start(self) -> "ProcessRssSampler":
        self.start_bytes = self.peak_bytes = self._rss()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> int:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.peak_bytes = max(self.peak_bytes, self._rss())
        return self.peak_bytes

    def __enter__(self) -> "ProcessRssSampler":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def mib(n_bytes: int | None) -> float | None:
    return None if n_bytes is None else round(n_bytes / 2**20, 1)

