"""Keep the checkpoint's memory-mapped pages from piling up in resident memory while it loads.

transformers reads safetensors files through mmap and converts the per-expert tensors into fused ones;
every page it reads stays mapped, so resident memory peaks at about twice the checkpoint although the
pages are clean and the kernel could drop them. While loading, a background thread tells the kernel,
a few times a second, to reclaim the mapped pages of the checkpoint's files (madvise MADV_PAGEOUT): an
unmodified file-backed page is read again from the file if touched, and a page that was written is
paged out, never dropped, so nothing changes but the peak. Linux 5.4 and later; elsewhere a no-op.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import sys
import threading
from pathlib import Path
from types import TracebackType

MADV_PAGEOUT = 21  # Linux 5.4+: reclaim the pages; data is never lost (unlike MADV_DONTNEED)


class ReleaseMappedPages:
    """Context manager: while inside, periodically drop resident pages of mappings of files under `folder`."""

    def __init__(self, folder: Path, interval_s: float = 0.1) -> None:
        self.folder = str(folder.resolve())
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._madvise = None
        if sys.platform.startswith("linux"):
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
            self._madvise = libc.madvise
            self._madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]

    def __enter__(self) -> "ReleaseMappedPages":
        if self._madvise is not None:
            self._thread = threading.Thread(target=self._run, name="moeplan-release-pages", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.release()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.release()

    def release(self) -> None:
        if self._madvise is None:
            return
        try:
            with open("/proc/self/maps", encoding="ascii", errors="replace") as maps:
                lines = maps.readlines()
        except OSError:
            return
        for line in lines:
            parts = line.split(maxsplit=5)
            if len(parts) < 6 or not parts[5].strip().startswith(self.folder):
                continue
            start, end = (int(x, 16) for x in parts[0].split("-"))
            self._madvise(start, end - start, MADV_PAGEOUT)  # fails harmlessly on old kernels
