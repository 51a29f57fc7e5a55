"""Stand-in for ``sglang.srt.layers.moe.token_dispatcher.base``: the dispatcher base class and the
dispatch/combine format protocols (runtime-checkable, as in SGLang: the dispatcher file asserts
``isinstance(MooncakeDispatchOutput, DispatchOutput)`` on the class)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from enum import Enum, auto
from typing import Any, Protocol, runtime_checkable


class DispatchOutputFormat(Enum):
    STANDARD = auto()
    DEEPEP_NORMAL = auto()
    DEEPEP_LL = auto()


class CombineInputFormat(Enum):
    STANDARD = auto()
    DEEPEP_NORMAL = auto()
    DEEPEP_LL = auto()


@runtime_checkable
class DispatchOutput(Protocol):
    @property
    def format(self) -> DispatchOutputFormat: ...


@runtime_checkable
class CombineInput(Protocol):
    @property
    def format(self) -> CombineInputFormat: ...


class BaseDispatcher(ABC):
    @abstractmethod
    def dispatch(self, *args: Any, **kwargs: Any) -> Any: ...

    @abstractmethod
    def combine(self, *args: Any, **kwargs: Any) -> Any: ...
