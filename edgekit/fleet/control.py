"""Operator control of a recorded rollout: pause, resume, abort (with or without a revert).

The rules, the same for every front end (`edgekit fleet pause/resume/abort` is one):

- A rollout that ended (completed, halted, aborted) takes no request: `ControlError`.
- While a controller drives the rollout (its lease has a fresh heartbeat), the request goes
  into the rollout database and that controller applies it within a poll interval
  (`RolloutController` reads it with `RolloutStore.take_request`).
- With no controller running, `pause` and `abort` (without a revert) change the stored state
  at once: nothing has to be sent to devices.
- With no controller running, `resume` and `abort --revert` need one: they sign and publish
  directives. The decision says so (`action == "drive"`, with the request the new controller
  applies first); the caller connects and runs `RolloutController.run`.

Pure store logic: no MQTT, no printing. Each function returns a `ControlDecision` whose
`message` is one line for the operator.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from edgekit.errors import EdgekitError
from edgekit.fleet.store import Request, RolloutStore

__all__ = ["ControlAction", "ControlDecision", "ControlError", "abort", "pause", "resume"]

ControlAction = Literal["requested", "applied", "drive"]


class ControlError(EdgekitError):
    """The rollout cannot take this request (it ended already)."""


@dataclass(frozen=True)
class ControlDecision:
    """What a control request did: `requested` (a live controller applies it), `applied`
    (the stored state changed; no controller runs) or `drive` (a controller must run here,
    applying `request` first, if any)."""

    action: ControlAction
    rollout_id: str
    message: str
    request: Request | None = None


def _ended(store: RolloutStore, rollout_id: str) -> None:
    record = store.rollout(rollout_id)
    if record.terminal:
        raise ControlError(f"rollout {rollout_id} already {record.state}")


def _ask(store: RolloutStore, rollout_id: str, request: Request) -> ControlDecision:
    store.request(rollout_id, request)  # refuses a rollout that ended
    return ControlDecision(
        "requested",
        rollout_id,
        f"asked the controller of {rollout_id} to {request.replace('_', ' ')}",
        request,
    )


def pause(store: RolloutStore, rollout_id: str) -> ControlDecision:
    """Start no new wave (devices already sent a directive carry on)."""
    if store.controller_alive(rollout_id):
        return _ask(store, rollout_id, "pause")
    _ended(store, rollout_id)
    store.set_state(rollout_id, "paused", reason="paused by the operator")
    return ControlDecision("applied", rollout_id, f"paused {rollout_id} (no controller running)")


def resume(store: RolloutStore, rollout_id: str) -> ControlDecision:
    """Un-pause; with no controller running, one must drive the rollout (`drive`).

    A rollout that ended is not an error here: driving it reports how it ended.
    """
    if store.controller_alive(rollout_id):
        return _ask(store, rollout_id, "resume")
    record = store.rollout(rollout_id)
    request: Request | None = "resume" if record.state == "paused" else None
    return ControlDecision(
        "drive", rollout_id, f"no controller runs {rollout_id}: driving it here", request
    )


def abort(store: RolloutStore, rollout_id: str, *, revert: bool = False) -> ControlDecision:
    """Stop the rollout for good; devices keep what they run unless `revert` (which, with no
    controller running, needs one to send the revert directives: `drive`)."""
    request: Request = "abort_revert" if revert else "abort"
    if store.controller_alive(rollout_id):
        return _ask(store, rollout_id, request)
    if revert:
        return ControlDecision(
            "drive", rollout_id, f"no controller runs {rollout_id}: reverting it here", request
        )
    _ended(store, rollout_id)
    store.set_state(rollout_id, "aborted", reason="aborted by the operator")
    return ControlDecision("applied", rollout_id, f"aborted {rollout_id} (no controller running)")
