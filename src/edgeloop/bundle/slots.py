"""A/B slot state and its transitions, as pure values.

The device keeps one small JSON document (the *pointer*) that says which slot is active,
what each slot holds and whether the active model is on probation. Every change builds a
new :class:`SlotState` here; the device layer writes it with write + fsync + rename, so a
reader (or a device rebooting after power loss) sees either the old pointer or the new
one. A slot's files are only trusted when their sha256 is the one the pointer records.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace

from edgeloop.bundle.health import Probation
from edgeloop.bundle.manifest import Manifest
from edgeloop.errors import VerificationError

__all__ = [
    "SLOTS",
    "Event",
    "SlotState",
    "begin_install",
    "commit",
    "fall_back",
    "keep_known_good",
    "other",
    "refused",
    "rollback",
]

SLOTS = ("a", "b")


def other(slot: str) -> str:
    """The slot that is not ``slot``."""
    return SLOTS[1 - SLOTS.index(slot)]


@dataclass(frozen=True)
class Event:
    """One entry of the device's history: when (UTC ISO time), what, which version, why."""

    time: str
    action: str
    version: str | None
    reason: str


@dataclass(frozen=True)
class SlotState:
    """Which slot serves, what each holds (manifest bytes as text, or None), probation."""

    active: str | None = None
    slots: tuple[str | None, str | None] = (None, None)
    probation: Probation | None = None

    def manifest(self, slot: str) -> Manifest | None:
        """The verified manifest of the bundle in ``slot``, if it holds one."""
        text = self.slots[SLOTS.index(slot)]
        return None if text is None else Manifest.from_bytes(text.encode())

    def current(self) -> Manifest | None:
        """The manifest of the active model."""
        return None if self.active is None else self.manifest(self.active)

    def target_slot(self) -> str:
        """Where the next install goes: the slot that is not serving."""
        return "a" if self.active is None else other(self.active)

    def to_bytes(self) -> bytes:
        """JSON of the state."""
        return json.dumps(asdict(self), indent=1, sort_keys=True).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> SlotState:
        """Parse the pointer; raise :class:`VerificationError` if it is malformed."""
        try:
            d = json.loads(data)
            p = d["probation"]
            state = cls(active=d["active"], slots=(d["slots"][0], d["slots"][1]),
                        probation=None if p is None else Probation(
                            **{**p, "latencies_ms": tuple(p["latencies_ms"])}))
            if state.active not in (None, *SLOTS):
                raise ValueError(f"unknown slot {state.active!r}")
            for s in SLOTS:
                state.manifest(s)
            return state
        except (ValueError, KeyError, TypeError, IndexError) as e:
            raise VerificationError(f"device state is malformed ({e})") from None


def _with_slot(state: SlotState, slot: str, text: str | None) -> tuple[str | None, str | None]:
    slots = list(state.slots)
    slots[SLOTS.index(slot)] = text
    return slots[0], slots[1]


def begin_install(state: SlotState) -> SlotState:
    """The state to persist before the inactive slot is overwritten: it holds nothing."""
    return replace(state, slots=_with_slot(state, state.target_slot(), None))


def commit(state: SlotState, manifest: Manifest, probation: Probation | None) -> SlotState:
    """Switch to the inactive slot, which now holds ``manifest``'s verified model."""
    slot = state.target_slot()
    return SlotState(active=slot, slots=_with_slot(state, slot, manifest.to_bytes().decode()),
                     probation=probation)


def rollback(state: SlotState) -> SlotState:
    """Switch back to the other slot; it must hold a verified model."""
    if state.active is None or state.manifest(other(state.active)) is None:
        raise VerificationError("no previous model to roll back to (the other slot is empty)")
    return SlotState(active=other(state.active), slots=state.slots, probation=None)


def fall_back(state: SlotState) -> SlotState:
    """Serve the other slot because the active slot's file does not match its manifest: the
    corrupt slot is marked empty, so nothing trusts its file until an update rewrites it."""
    back = rollback(state)
    return replace(back, slots=_with_slot(back, other(back.active), None))  # type: ignore[arg-type]


def keep_known_good(state: SlotState, candidate: str) -> None:
    """Raise :class:`VerificationError` if installing ``candidate`` now would overwrite the
    last known-good model: while the active model is on probation, the other slot (where
    an install goes) holds it. With that slot empty (the first install) nothing is lost."""
    known = state.manifest(state.target_slot())
    current = state.current()
    if state.probation is None or known is None or current is None:
        return
    raise VerificationError(
        f"not installing {candidate}: {current.version} is on probation "
        f"({state.probation.remaining} inferences to go) and the slot an install would "
        f"overwrite holds the last known-good model, {known.version}; update again after "
        "probation, or roll back first")


def refused(events: list[Event], version: str) -> Event | None:
    """The event that turned ``version`` away on this device (failed health check or
    rolled back), if any: a device does not install a version it already refused. A
    version whose file was found corrupt on disk (``corrupt``) or that was only too slow
    once (``deferred``) may be installed again."""
    return next((e for e in reversed(events)
                 if e.version == version and e.action in ("rejected", "rollback")), None)
