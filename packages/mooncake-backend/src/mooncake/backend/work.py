"""``MooncakeWork``: a ``torch.distributed.Work`` over a ``torch.futures.Future`` that supports
``wait(timeout)`` (torch's future-wrapping Work refuses finite timeouts)."""

from __future__ import annotations

import threading
from datetime import timedelta
from typing import Any, Optional, Union

import torch
import torch.distributed as dist


class MooncakeWork(dist.Work):
    def __init__(self, fut: Optional[torch.futures.Future], result: Any = None) -> None:
        super().__init__()
        self._fut = fut
        self._result = result
        self._done: Optional[threading.Event] = None
        if fut is not None and not fut.done():  # completed works (the common case) need no event
            self._done = threading.Event()
            fut.add_done_callback(lambda _: self._done.set())

    @classmethod
    def completed(cls, result: Any) -> MooncakeWork:
        """A work for an op that already finished (the future is made only if asked for)."""
        return cls(None, result)

    def _future(self) -> torch.futures.Future:
        if self._fut is None:
            fut: torch.futures.Future = torch.futures.Future()
            fut.set_result(self._result)
            self._fut = fut
        return self._fut

    def wait(self, timeout: Union[timedelta, float, None] = None) -> bool:
        """Block until the op finished; re-raise its error. ``timeout`` (timedelta or seconds):
        raise ``TimeoutError`` if it has not finished by then (the op keeps its own deadline)."""
        secs: Optional[float]
        if isinstance(timeout, timedelta):
            secs = timeout.total_seconds()
        else:
            secs = timeout
        if secs is not None and secs > 0 and self._done is not None and not self._done.wait(secs):
            raise TimeoutError(f"mooncake work did not finish within {secs:.3f} s")
        if self._fut is not None:
            self._fut.wait()  # raises the op's exception, if any
        return True

    def is_completed(self) -> bool:
        return self._fut is None or self._fut.done()

    def is_success(self) -> bool:
        if self._fut is None:
            return True
        if not self._fut.done():
            return False
        try:
            self._fut.value()
            return True
        except Exception:
            return False

    def exception(self):
        if self._fut is None:
            return None
        try:
            self._fut.value()
        except Exception as e:
            return e
        return None

    def get_future(self) -> torch.futures.Future:
        return self._future()

    def result(self):
        return self._future().value()

    def synchronize(self) -> None:
        self.wait()
