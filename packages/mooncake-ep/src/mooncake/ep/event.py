"""``EventOverlap``: the ``event`` that ``dispatch``/``combine`` return (DeepEP's class)."""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch

# torch.cuda.current_stream() builds a new Stream object per call (a device switch in Python);
# the ops and the waits of async_finish ask for it on every call, so keep one per stream.
_get_current_stream = getattr(torch._C, "_cuda_getCurrentStream", None)
_streams: dict[tuple, Any] = {}


def current_cuda_stream(device_index: Optional[int] = None) -> Any:
    """``torch.cuda.current_stream(device_index)``, one Stream object per (stream id, device)."""
    if _get_current_stream is None:  # a torch without the accessor
        return torch.cuda.current_stream(device_index)
    if device_index is None:
        device_index = torch.cuda.current_device()
    key = _get_current_stream(device_index)
    stream = _streams.get(key)
    if stream is None:
        if len(_streams) >= 64:
            _streams.clear()
        stream = _streams[key] = torch.cuda.Stream(
            stream_id=key[0], device_index=key[1], device_type=key[2]
        )
    return stream


class EventOverlap:
    """Completion of an op issued with ``async_finish=True``.

    ``current_stream_wait()`` makes the current stream (CUDA) or the caller (CPU) wait until the
    op's results are usable. Used as a context manager, the wait happens on exit, so the body
    overlaps with the communication. For an op issued without ``async_finish`` the event is already
    complete and waiting is a no-op.

    Args:
        event: a ``torch.cuda.Event`` recorded on the stream that finishes the op, or ``None``.
        extra_tensors: tensors kept alive until the event is waited on (DeepEP's argument).
        on_wait: called once, on the host, by the first wait (the portable path finishes its receive
            phase here: it waits for the collective's deadline-bounded completion and unpacks).
    """

    def __init__(
        self,
        event: Optional[Any] = None,
        extra_tensors: Optional[tuple[torch.Tensor, ...]] = None,
        on_wait: Optional[Callable[[], None]] = None,
    ) -> None:
        self.event = event
        self.extra_tensors = extra_tensors
        self._on_wait = on_wait

    def current_stream_wait(self) -> None:
        """Wait for the op: runs the pending receive phase (if any), then orders the current stream
        after the CUDA event (if any)."""
        on_wait, self._on_wait = self._on_wait, None
        if on_wait is not None:
            on_wait()
        if self.event is not None:
            current_cuda_stream().wait_event(self.event)
        self.extra_tensors = None

    @property
    def done(self) -> bool:
        """True when no host-side wait is pending (a CUDA event may still be in flight)."""
        return self._on_wait is None

    def __enter__(self) -> EventOverlap:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self.current_stream_wait()

    def __repr__(self) -> str:
        state = "done" if self.done else "pending"
        return f"EventOverlap({state}, cuda_event={self.event is not None})"
