"""State machines as explicit transition tables (after Dragonfly's scheduler/resource FSMs)."""

from __future__ import annotations

import enum
from collections.abc import Mapping
from typing import Generic, TypeVar

from shared.errors import InvalidStateTransition

S = TypeVar("S", bound=enum.Enum)
E = TypeVar("E", bound=enum.Enum)


class TransitionTable(Generic[S, E]):
    """A finite state machine declared as ``{(state, event): next_state}``; anything else is illegal."""

    def __init__(self, name: str, transitions: Mapping[tuple[S, E], S]) -> None:
        self.name = name
        self._transitions = dict(transitions)

    def next_state(self, state: S, event: E) -> S:
        """The state after ``event`` in ``state``; raises InvalidStateTransition when not allowed."""
        try:
            return self._transitions[(state, event)]
        except KeyError:
            raise InvalidStateTransition(self.name, state.value, event.value) from None

    def allows(self, state: S, event: E) -> bool:
        """Whether ``event`` is legal in ``state``."""
        return (state, event) in self._transitions

    @property
    def transitions(self) -> Mapping[tuple[S, E], S]:
        """The whole table, for documentation and exhaustive tests."""
        return dict(self._transitions)
