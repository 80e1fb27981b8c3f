"""An outbox item's life (``agent.core.items``): the table, and ``Flights`` against a
model of its own that knows only what each event means."""

from __future__ import annotations

import json

import pytest
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from agent.core import items
from agent.core.items import FINAL, Flights, ItemEvent, ItemState, Outgoing
from agent.core.purposes import Purpose
from agent.errors import IllegalTransition

S, E = ItemState, ItemEvent


@pytest.mark.parametrize("state", list(ItemState))
@pytest.mark.parametrize("event", list(ItemEvent))
def test_every_move_is_in_the_table_or_raises(state: ItemState, event: ItemEvent) -> None:
    if (state, event) in items.TRANSITIONS:
        assert items.item_step(state, event) is items.TRANSITIONS[(state, event)]
    else:
        with pytest.raises(IllegalTransition):
            items.item_step(state, event)


def test_final_states_have_no_exit() -> None:
    assert not any(s in FINAL for s, _ in items.TRANSITIONS)


def test_every_held_state_can_end() -> None:
    """From every state an item can reach, a final state can be reached: nothing is
    held for ever."""
    ends = set(FINAL)
    while True:
        more = {s for (s, _e), to in items.TRANSITIONS.items() if to in ends} - ends
        if not more:
            break
        ends |= more
    assert ends == set(ItemState)


def _out(n: int, purpose: Purpose | None) -> Outgoing:
    payload = json.dumps({"data": {"n": n}}).encode()
    kind = "deletion-request" if purpose is None else purpose.value
    return Outgoing(f"m{n}", kind, purpose, payload, float(n))


class FlightsModel(RuleBasedStateMachine):
    """Random events for a handful of items; the model says where each must be."""

    def __init__(self) -> None:
        super().__init__()
        self.flights = Flights()
        self.model: dict[str, ItemState] = {}
        self.entries: dict[str, bool] = {}  # msg_id -> confirmed, once it left
        self.purpose: dict[str, Purpose | None] = {}
        self.n = 0

    @rule(purpose=st.sampled_from([None, *Purpose]))
    def hand_off(self, purpose: Purpose | None) -> None:
        self.n += 1
        out = _out(self.n, purpose)
        self.flights.hand_off(out)
        self.model[out.msg_id] = S.IN_FLIGHT
        self.purpose[out.msg_id] = purpose

    def _ids(self) -> list[str]:
        return sorted(self.model)

    @precondition(lambda self: self.model)
    @rule(data=st.data(), event=st.sampled_from(list(ItemEvent)))
    def event(self, data: st.DataObject, event: ItemEvent) -> None:
        msg_id = data.draw(st.sampled_from(self._ids()))
        state = self.model[msg_id]
        expected = _meaning(state, event, self.purpose[msg_id])
        if expected is None:
            with pytest.raises(IllegalTransition):
                self.flights.move(msg_id, event, at=1.0)
            return
        assert self.flights.move(msg_id, event, at=1.0) is expected
        if expected is S.LEFT and state is not S.LEFT and self.purpose[msg_id] is not None:
            self.entries[msg_id] = event is E.ACK
        if expected in FINAL or expected is S.QUEUED:
            del self.model[msg_id]
        else:
            self.model[msg_id] = expected

    @invariant()
    def agrees(self) -> None:
        for msg_id, state in self.model.items():
            assert self.flights.state(msg_id) is state
            held = self.flights.get(msg_id)
            assert held is not None
            if state is S.LEFT and self.purpose[msg_id] is not None:
                assert held.entry is not None
                assert held.entry["confirmed"] is self.entries[msg_id]
                assert held.entry["msg_id"] == msg_id
        assert len(self.flights) == len(self.model)


def _meaning(state: ItemState, event: ItemEvent, purpose: Purpose | None) -> ItemState | None:
    """What each event means for a held item, said in words rather than as a table."""
    if event is E.WIPE:
        return S.DROPPED  # a wipe takes everything personal it holds (P9)
    if state is S.IN_FLIGHT:
        return {
            E.ACK: S.LEFT,  # confirmed
            E.REQUEUE: S.QUEUED,  # never handed over, or refused: it waits again
            E.LOST: S.QUEUED,  # no PUBACK will come on this connection: sent again
            E.DROP: S.RECALLED,  # its row went, but it is on the wire
        }.get(event)
    if state is S.RECALLED:
        return {
            E.ACK: S.LEFT,
            E.LOST: S.LEFT,  # written out, never confirmed: ledgered as such (P11)
            E.REQUEUE: S.DROPPED,  # refused: it never reached the cloud, its row is gone
        }.get(event)
    if state is S.LEFT:
        return {E.RECORD: S.SENT, E.DROP: S.LEFT}.get(event)
    return None


TestFlights = FlightsModel.TestCase


def test_an_item_not_held_is_queued_and_cannot_be_acknowledged() -> None:
    flights = Flights()
    assert flights.state("nope") is S.QUEUED
    with pytest.raises(IllegalTransition):
        flights.move("nope", E.ACK)
