"""The update state machine (DESIGN.md "Agent state machine").

    idle -> downloading -> verifying -> installing -> checking -> activating -> probation
         -> committed,   or -> rolled_back from any step (pointer back, bundle marked bad)

Every transition is written to the journal (fsync'd) before it takes effect and then
reported (a `state` event and a retained status); a rollback too: `rolled_back` is journaled
(with whether the bundle is at fault) before the bundle goes in `bad.json`. `Updater.start`
recovers from whatever the journal says: steps before activation are redone (each is
idempotent) once and rolled back (bundle marked bad) if the agent dies in the same step
again, an interrupted activation is finished, a probation is resumed once and rolled back if
the agent dies in it again, an interrupted rollback is finished, and a `bad.json` entry for
the journal's bundle and sequence counts as a decided rollback. The bundle is verified once
per install, while it is extracted into the idle slot's staging folder (verifying), and the
verified directive is passed along the pipeline (read back from the journal only after a
restart). A newer valid directive cancels a download in progress.

Before the pointer swap, the replaced model's latency baseline is written to
`probation.json` (atomically, fsync'd); probation checkpoints the time it has observed
there, so a resumed probation judges p95 against that baseline and runs only the remaining
window (at least `_MIN_RESUMED_FRACTION` of it: the new model's statistics
restart at zero). Shadow comparison stays off after a restart (the previous runtime is not
loaded again); the `probation` state event's details say so. The record is removed when the
update commits or rolls back. A slot reused for an update (a rollback directive naming
the bundle the idle slot still holds) is re-verified against today's trust store and epoch
floor, as is the serving bundle when a directive names it. `bad.json` records which bundles
failed and why (shown by `edgekit-agent status`); what keeps a failed directive from being
retried is the sequence floor, not that list: only a newer directive can name it again.
The model that serves meanwhile is always a verified slot (re-hashed at start).
"""

from __future__ import annotations

import collections
import json
import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Protocol

from edgekit.agent.config import AgentConfig
from edgekit.agent.download import Fetcher
from edgekit.agent.health import HealthReport, run_health_check
from edgekit.agent.journal import Journal, JournalRecord, StorageError, fault_point
from edgekit.agent.oip import InferenceLimits
from edgekit.agent.serving import ModelHost, read_golden_tolerance
from edgekit.agent.store import Pointer, SlotInfo, Store
from edgekit.agent.telemetry import StatsSnapshot

from edgekit import __version__
from edgekit.bundle import Limits, hash_file
from edgekit.contract import Accepted, Duplicate, Refused, accept_directive, bundle_mismatch
from edgekit.errors import BundleError, EdgekitError, TransportError, first_line
from edgekit.messages import BundleId, Event, Status
from edgekit.profiles import Budgets, Profile
from edgekit.runtimes import Runtime, open_runtime
from edgekit.trust import (
    DEFAULT_MAX_ENVELOPE_BYTES,
    BundleRef,
    Directive,
    DirectiveFloor,
    TrustStore,
    TrustUpdate,
    TrustUpdateError,
    parse_envelope,
    verify_directive,
    verify_trust_message,
)

__all__ = [
    "AGENT_VERSION",
    "PROBATION_SCHEMA",
    "Reporter",
    "UpdateFailed",
    "Updater",
    "effective_budgets",
    "remaining_probation_s",
]

log = logging.getLogger(__name__)

AGENT_VERSION = __version__
_MAX_PROBATION_RESTARTS = 1
_MAX_RESUMES = 1  # restarts resumed in one pre-activation state; dying again rolls back
_PRE_ACTIVATION = ("downloading", "verifying", "installing", "checking")
_DOWNLOAD_ATTEMPTS = 5
PROBATION_SCHEMA = "edgekit.agent-probation/v1"
_MIN_RESUMED_FRACTION = 0.1  # a resumed probation runs at least this share of the window
_CHECKPOINT_MIN_S = 0.5  # how often probation records the time it has observed
_CHECKPOINT_MAX_S = 30.0


class Reporter(Protocol):
    """Where the updater's events and status go (the MQTT session, or a test's list)."""

    def event(self, event: Event) -> None: ...

    def status(self, status: Status) -> None: ...


class UpdateFailed(EdgekitError):  # noqa: N818 - reads as the outcome it names
    """An update step failed; the update is rolled back with this reason."""

    def __init__(self, reason: str, *, refused: bool = False, mark_bad: bool = True) -> None:
        super().__init__(reason)
        self.reason = reason
        self.refused = refused  # the bundle itself is untrusted or broken (bundle_refused)
        self.mark_bad = mark_bad


def effective_budgets(profile: Profile, config: AgentConfig) -> Budgets:
    """The profile's budgets with the config's overrides applied."""
    base, over = profile.budgets, config.budgets
    return Budgets(
        max_model_bytes=over.max_model_bytes or base.max_model_bytes,
        max_ram_bytes=over.max_ram_bytes or base.max_ram_bytes,
        max_latency_ms=over.max_latency_ms or base.max_latency_ms,
    )


DEFAULT_INFERENCE_MEMORY_BYTES = 256 << 20
"""What inference may use when neither the config nor the profile names a RAM budget."""


def inference_limits(config: AgentConfig, budgets: Budgets) -> InferenceLimits:
    """The bounds of local inference: `[inference]` settings, the rest derived from
    `inference.memory_bytes`, else the RAM budget, else `DEFAULT_INFERENCE_MEMORY_BYTES`."""
    settings = config.inference
    memory = settings.memory_bytes or budgets.max_ram_bytes or DEFAULT_INFERENCE_MEMORY_BYTES
    derived = InferenceLimits.for_memory(memory, max_concurrent=settings.max_concurrent)
    return replace(
        derived,
        queue_wait_s=settings.queue_wait_s,
        max_connections=settings.max_connections,
        request_timeout_s=settings.request_timeout_s,
        idle_timeout_s=settings.idle_timeout_s,
        max_body_bytes=settings.max_body_bytes or derived.max_body_bytes,
        max_request_elements=settings.max_request_elements or derived.max_request_elements,
        max_response_elements=settings.max_response_elements or derived.max_response_elements,
    )


def remaining_probation_s(window_s: float, observed_s: float) -> float:
    """The probation time left after a restart: the window minus what was observed before
    it (downtime does not count), at least `_MIN_RESUMED_FRACTION` of the window, at most all
    of it (an unreadable record counts as nothing observed)."""
    window = max(0.0, window_s)
    observed = observed_s if math.isfinite(observed_s) and observed_s > 0 else 0.0
    return min(window, max(window - observed, window * _MIN_RESUMED_FRACTION))


def _snapshot_from(document: Any) -> StatsSnapshot | None:
    """The baseline snapshot a probation record holds (None if absent or malformed)."""
    if not isinstance(document, dict):
        return None

    def number(key: str) -> float | None:
        value = document.get(key)
        return float(value) if isinstance(value, int | float) and value >= 0 else None

    try:
        return StatsSnapshot(
            requests=int(document.get("requests", 0)),
            errors=int(document.get("errors", 0)),
            rejected=int(document.get("rejected", 0)),
            p50_ms=number("p50_ms"),
            p95_ms=number("p95_ms"),
            p99_ms=number("p99_ms"),
            max_ms=number("max_ms"),
            window_s=float(document.get("window_s", 0.0)),
        )
    except (TypeError, ValueError):
        return None


@dataclass
class _ProbationPlan:
    """How this probation runs: its window, its latency baseline, shadow or not."""

    document: dict[str, Any]  # the probation record, checkpointed while it runs
    resumed: bool  # after a restart (this process did not swap the models)
    remaining_s: float
    observed_s: float  # probation time observed before this run (from the record)
    baseline: StatsSnapshot | None
    baseline_source: str | None  # "live" (this process swapped), "persisted", or None
    shadow: bool
    shadow_note: str | None

    def details(self, window_s: float) -> dict[str, Any]:
        baseline = self.baseline
        details: dict[str, Any] = {
            "resumed": self.resumed,
            "window_s": window_s,
            "remaining_s": round(self.remaining_s, 3),
            "baseline_source": self.baseline_source,
            "baseline_requests": baseline.requests if baseline else None,
            "baseline_p95_ms": baseline.p95_ms if baseline else None,
            "shadow": self.shadow,
        }
        if self.shadow_note:
            details["shadow_note"] = self.shadow_note
        return details


@dataclass
class _Candidate:
    """The model being rolled out, once it is loaded."""

    slot: SlotInfo
    runtime: Runtime


class Updater:
    """Applies directives to the device's slots; thread-safe entry points are `submit`,
    `status` and `snapshot`. Run `start()` once, then `run(stop)` in a worker thread."""

    def __init__(
        self,
        *,
        config: AgentConfig,
        profile: Profile,
        store: Store,
        trust: TrustStore,
        host: ModelHost,
        fetcher: Fetcher,
        reporter: Reporter,
        clock: Callable[[], datetime] = lambda: datetime.now(timezone.utc),
        trust_envelope: bytes = b"",
    ) -> None:
        self.config = config
        self.profile = profile
        self.store = store
        self.journal = Journal(store.journal_path)
        self.trust = trust
        self.trust_envelope = trust_envelope  # the signed form of `trust` (its floor)
        self._trust_lock = threading.Lock()
        self.host = host
        self.fetcher = fetcher
        self.reporter = reporter
        self.clock = clock
        self.budgets = effective_budgets(profile, config)
        self.inference_limits = inference_limits(config, self.budgets)
        self.record = JournalRecord()
        self._pending: collections.deque[bytes] = collections.deque(maxlen=16)
        self._wake = threading.Condition()
        self._previous_runtime: Runtime | None = None  # kept during probation: fast rollback
        self._serving: Runtime | None = None
        self._busy = False
        self._resume = False
        self._recovered_failure: str | None = None  # a rollback decided at start, to report
        self._swapped = False  # this process swapped the host to the candidate
        self._superseded = threading.Event()  # a newer directive arrived during a download
        self._plan: _ProbationPlan | None = None

    # -- reporting -----------------------------------------------------------------------

    def _bundle_of(self, slot: str | None) -> BundleId | None:
        if slot is None:
            return None
        try:
            info = self.store.slot_info(slot)
        except EdgekitError:
            return None
        return info.bundle if info else None

    def status(self, *, online: bool = True) -> Status:
        """The device's status as the retained `status` message carries it."""
        try:
            pointer = self.store.pointer()
            floor, _ = self.store.floor()
            last_sequence = floor.last_sequence
        except EdgekitError:
            pointer, last_sequence = Pointer(), self.record.sequence
        previous = self._bundle_of(pointer.previous)
        failed = self.record.bundle if self.record.state == "rolled_back" else None
        if previous is not None and failed is not None and previous.sha256 == failed.sha256:
            # The idle slot holds the bundle just rolled back from: not one to go back to.
            previous = None
        return Status(
            fleet=self.config.fleet,
            device=self.config.device_id,
            online=online,
            state=self.record.state,
            profile=self.profile.name,
            group=self.config.group,
            tags=dict(self.config.tags),
            active=self._bundle_of(pointer.active),
            previous=previous,
            rollout_id=self.record.rollout_id,
            last_sequence=last_sequence,
            agent_version=AGENT_VERSION,
            ts=time.time(),
        )

    def emit_event(self, kind: str, **fields: Any) -> None:
        """Report an event (`edgekit.topics.EVENT_KINDS`) about the current update."""
        fields.setdefault("rollout_id", self.record.rollout_id)
        fields.setdefault("bundle", self.record.bundle)
        event = Event(
            fleet=self.config.fleet,
            device=self.config.device_id,
            kind=kind,
            ts=time.time(),
            **fields,
        )
        try:
            self.reporter.event(event)
        except (EdgekitError, OSError, ValueError) as e:
            log.error("cannot report %s event: %s", kind, first_line(e))

    def _publish_status(self) -> None:
        try:
            self.reporter.status(self.status())
        except (EdgekitError, OSError, ValueError) as e:
            log.error("cannot publish status: %s", first_line(e))

    def report_error(self, message: str, **details: Any) -> None:
        """Log and report a problem the agent survives (disk full, corrupt journal)."""
        log.error("%s", message)
        self.emit_event("error", reason=message, details=details, bundle=None)

    def _enter(self, state: str, *, details: dict[str, Any] | None = None, **changes: Any) -> None:
        """Journal the transition (durably), then report it (`details` go in the event)."""
        record = self.record.advance(state, **changes)
        self.journal.write(record)
        self.record = record
        fault_point(f"{state}/journaled")
        log.info(
            "state %s (sequence %d, %s)",
            state,
            record.sequence,
            f"{record.bundle.name} {record.bundle.version}" if record.bundle else "no bundle",
        )
        self.emit_event(
            "state",
            state=state,
            sequence=record.sequence,
            reason=record.reason,
            details=details or {},
        )
        self._publish_status()

    # -- trust rotation --------------------------------------------------------------------

    def apply_trust(self, payload: bytes) -> TrustUpdate | None:
        """Apply a `trust` message (newer trust store versions, by the rotation rule): the new
        version is made the device's floor on disk before it is used. Reports
        `trust_updated` or `trust_refused`; None if refused."""
        with self._trust_lock:
            try:
                update = verify_trust_message(
                    payload,
                    current=self.trust,
                    current_envelope=self.trust_envelope,
                    fleet=self.config.fleet,
                    now=self.clock(),
                )
            except TrustUpdateError as e:
                log.warning("refused a trust message: %s", first_line(e))
                self.emit_event(
                    "trust_refused",
                    reason=first_line(e),
                    bundle=None,
                    rollout_id=None,
                    details={"version": self.trust.version},
                )
                return None
            if not update.applied:
                return update  # nothing newer (a retained message seen again)
            try:
                self.store.set_trust_floor(update.envelope)
            except StorageError as e:
                self.report_error(f"cannot keep trust store version {update.store.version}: {e}")
                return None
            self.trust, self.trust_envelope = update.store, update.envelope
        log.info("trust store rotated to version %d", update.store.version)
        self.emit_event(
            "trust_updated",
            ok=True,
            bundle=None,
            rollout_id=None,
            details={"version": update.store.version, "applied": list(update.applied)},
        )
        return update

    # -- start and recovery --------------------------------------------------------------

    def start(self) -> None:
        """Recover from the journal and load the active slot into the host (no network)."""
        try:
            self.store.ensure_layout()
        except StorageError as e:
            self.report_error(str(e))
        try:
            self.record = self.journal.read()
        except StorageError as e:
            self.record = JournalRecord(state="idle")
            self.report_error(f"{e}; continuing with the last good model", file="journal")
        self._recover_pointer()
        if self.record.state not in ("activating", "probation"):
            self._clear_probation()
        try:
            removed = self.store.remove_leftovers(
                keep_staging=self.record.state in ("verifying", "installing")
            )
            if removed:
                log.info("removed what an interrupted write left behind: %s", removed)
        except OSError as e:
            log.warning("cannot remove leftovers of an interrupted write: %s", first_line(e))
        self._load_active()
        if self.host.bundle is None and self.config.initial_bundle is not None:
            self._install_initial(self.config.initial_bundle)
        if self._recovered_failure is not None:
            reason, self._recovered_failure = self._recovered_failure, None
            log.error("update to sequence %d rolled back: %s", self.record.sequence, reason)
            self.emit_event(
                "rolled_back",
                ok=False,
                reason=reason,
                sequence=self.record.sequence,
                state="rolled_back",
            )
        self._publish_status()

    def _recover_pointer(self) -> None:
        record = self.record
        state = record.state
        try:
            self._recover_floor(record)
            pointer = self.store.pointer()
            decided = self._decided_failure(record)
            if decided is not None:
                # bad.json names this update's bundle and sequence: the rollback was decided
                # (an earlier agent marked it bad before journaling the rollback).
                self._rollback_on_disk(decided)
                self._recovered_failure = decided
            elif state == "activating" and record.slot is not None:
                # The candidate passed its checks before "activating" was journaled: finish.
                if pointer.active != record.slot:
                    self.store.set_pointer(Pointer(record.slot, record.previous_slot))
                self._resume = True
            elif state == "probation":
                if record.probation_restarts >= _MAX_PROBATION_RESTARTS:
                    reason = "the agent restarted during probation again"
                    self._rollback_on_disk(reason)
                    self._recovered_failure = reason
                else:
                    # Count the restart, so that dying in probation again rolls back.
                    self.record = record.advance(
                        "probation", probation_restarts=record.probation_restarts + 1
                    )
                    self.journal.write(self.record)
                    self._resume = True
            elif state == "rolled_back":
                # Finish it: the record says whether the bundle was at fault (a download or
                # storage failure is not), and marking it bad again is harmless.
                self._rollback_on_disk(
                    record.reason or "rolled back", mark_bad=record.bundle_at_fault
                )
            elif state in _PRE_ACTIVATION:
                if record.slot is not None and pointer.active == record.slot:
                    # Never install over the serving slot (a journal from an older pointer).
                    self._fail_journal("the slot to install into is serving; update abandoned")
                elif state != "downloading" and record.attempts >= _MAX_RESUMES:
                    # (A download never runs the bundle and resumes from its bitmap: power
                    # cuts mid-download are routine on a device and never the bundle's fault.)
                    # The agent died in this state before (e.g. the candidate crashes the
                    # runtime or runs out of memory in its health check): give up on it.
                    reason = f"the agent died in state {state} {record.attempts + 1} times"
                    self._rollback_on_disk(reason)
                    self._recovered_failure = reason
                else:
                    # Count the resume, so that dying in this state again rolls back.
                    self.record = record.advance(state, attempts=record.attempts + 1)
                    self.journal.write(self.record)
                    fault_point(f"{state}/resumed")
                    self._resume = True
        except StorageError as e:
            self.report_error(f"cannot recover the update journal: {e}")
            self._resume = False

    def _recover_floor(self, record: JournalRecord) -> None:
        """The floor is written right after the journal accepts a directive: redo it."""
        if not record.directive:
            return
        floor, _ = self.store.floor()
        if floor.last_sequence >= record.sequence:
            return
        try:
            directive = Directive.from_payload(parse_envelope(record.directive).payload)
        except BundleError as e:
            log.warning("journaled directive is unreadable: %s", first_line(e))
            return
        recovered = DirectiveFloor(
            max(floor.last_sequence, directive.sequence),
            max(floor.min_security_epoch, directive.min_security_epoch),
        )
        self.store.set_floor(recovered, directive=record.directive)

    def _decided_failure(self, record: JournalRecord) -> str | None:
        """The reason bad.json gives for this update's bundle and sequence, if the journal
        has not reached rolled_back yet (None otherwise)."""
        if record.state in ("idle", "committed", "rolled_back") or record.bundle is None:
            return None
        return self.store.is_bad(record.bundle.sha256, sequence=record.sequence)

    def _fail_journal(self, reason: str) -> None:
        self.record = self.record.advance("rolled_back", reason=reason, bundle_at_fault=False)
        self.journal.write(self.record)

    def _rollback_on_disk(self, reason: str, *, mark_bad: bool = True) -> None:
        """Finish a rollback: journaled first, then the bundle marked bad, pointer back."""
        record = self.record
        if record.state != "rolled_back":
            record = self.record = record.advance(
                "rolled_back", reason=reason, bundle_at_fault=mark_bad
            )
            self.journal.write(record)
        if mark_bad and record.bundle is not None:
            self.store.mark_bad(record.bundle.sha256, sequence=record.sequence, reason=reason)
        pointer = self.store.pointer()
        if record.slot is not None and pointer.active == record.slot:
            self.store.set_pointer(Pointer(record.previous_slot, record.slot))
        self._clear_probation()

    def _load_active(self) -> None:
        """Serve the pointer's slot after re-hashing it; fall back to the other slot."""
        try:
            pointer = self.store.pointer()
        except StorageError as e:
            self.report_error(str(e))
            return
        for slot in (pointer.active, pointer.previous):
            if slot is None:
                continue
            try:
                info = self.store.verify_slot(slot)
                runtime = open_runtime(info.model_path, threads=self.config.update.threads)
            except EdgekitError as e:
                self.report_error(f"slot {slot} cannot serve: {first_line(e)}", slot=slot)
                continue
            self._activate_host(info, runtime)
            if slot != pointer.active:
                try:
                    if self.record.state in ("activating", "probation"):
                        # The new slot is damaged: this is a rollback, with its reason.
                        self._rollback_on_disk(f"slot {pointer.active} failed verification")
                    else:
                        self.store.set_pointer(Pointer(slot, None))
                except StorageError as e:
                    self.report_error(str(e))
                self._resume = False
            return

    def _activate_host(self, info: SlotInfo, runtime: Runtime) -> None:
        golden = info.path_of("golden")
        stats_path = info.path_of("reference_stats")
        reference: dict[str, Any] | None = None
        if stats_path is not None:
            try:
                loaded = json.loads(stats_path.read_text())
                reference = loaded if isinstance(loaded, dict) else None
            except (OSError, ValueError) as e:
                log.warning("ignoring %s: %s", stats_path, first_line(e))
        self.host.activate(
            runtime,
            info.bundle,
            tolerance=read_golden_tolerance(golden) if golden else None,
            reference_stats=reference,
        )
        self._serving = runtime

    def _install_initial(self, path: Path) -> None:
        """First boot: install, check and activate the factory bundle from the config."""
        slot = self.store.idle_slot()
        try:
            _, sha = hash_file(path)
            floor, _ = self.store.floor()
            self.store.stage(
                slot,
                path,
                trust=self.trust,
                min_security_epoch=floor.min_security_epoch,
                expected_sha256=sha,
                limits=self._limits(),
            )
            info = self.store.commit_staged(slot)
            self._check_profile(info)
            report = self._health(info)
            if not report.ok or report.runtime is None:
                raise UpdateFailed(f"health check failed: {report.reason}")
            self.record = JournalRecord(state="committed", bundle=info.bundle, slot=slot)
            self.journal.write(self.record)
            self.store.set_pointer(Pointer(slot, None))
            self._activate_host(info, report.runtime)
            log.info("installed the initial bundle %s %s", info.bundle.name, info.bundle.version)
        except (EdgekitError, OSError) as e:
            self.store.clear_slot(slot)
            self.report_error(f"cannot install the initial bundle {path}: {first_line(e)}")

    # -- directives ----------------------------------------------------------------------

    def submit(self, envelope: bytes) -> bool:
        """Queue a directive envelope (from the MQTT thread); the worker verifies it.

        An envelope over the size any directive may have (`DEFAULT_MAX_ENVELOPE_BYTES`) is
        dropped here, with an event, so the queue never holds copies of oversized payloads.
        Returns True if the envelope was queued.
        """
        if not envelope:
            return False
        if len(envelope) > DEFAULT_MAX_ENVELOPE_BYTES:
            reason = (
                f"desired payload of {len(envelope)} bytes exceeds the "
                f"{DEFAULT_MAX_ENVELOPE_BYTES}-byte directive limit; dropped unread"
            )
            log.warning("%s", reason)
            self.emit_event(
                "directive_refused",
                reason=reason,
                sequence=None,
                rollout_id=None,
                bundle=None,
                details={"rule": "LimitError", "size_bytes": len(envelope)},
            )
            return False
        with self._wake:
            self._pending.append(bytes(envelope))
            self._wake.notify_all()
        if self.record.state == "downloading" and self._supersedes(envelope):
            log.info("a newer directive arrived: cancelling the download of the current one")
            self._superseded.set()
        return True

    def _supersedes(self, envelope: bytes) -> bool:
        """Whether `envelope` is a valid directive newer than the update in progress (checked
        in full, so that nothing forged or replayed can cancel a download)."""
        try:
            floor, _ = self.store.floor()
            verify_directive(
                envelope,
                truststore=self.trust,
                fleet=self.config.fleet,
                device=self.config.device_id,
                floor=DirectiveFloor(
                    max(floor.last_sequence, self.record.sequence), floor.min_security_epoch
                ),
                now=self.clock(),
            )
        except EdgekitError:
            return False
        return True

    @property
    def busy(self) -> bool:
        """True while a directive is being processed or waits."""
        return self._busy or bool(self._pending)

    def run(self, stop: threading.Event) -> None:
        """The worker loop: finish a recovered update, then apply directives as they come."""
        if self._resume:
            self._resume = False
            self._busy = True
            try:
                self._continue(stop, directive=self._journaled_directive())
            finally:
                self._busy = False
        while not stop.is_set():
            with self._wake:
                while not self._pending and not stop.is_set():
                    self._wake.wait(timeout=0.5)
                if stop.is_set():
                    return
                envelope = self._pending.popleft()
                self._busy = True
            try:
                self.process(envelope, stop=stop)
            except Exception as e:
                log.exception("processing a directive failed")
                self.report_error(f"processing a directive failed: {first_line(e)}")
            finally:
                self._busy = False

    def process(self, envelope: bytes, *, stop: threading.Event | None = None) -> None:
        """Verify a directive and, if accepted, run the update to committed or rolled back."""
        stop = stop or threading.Event()
        self._superseded.clear()
        try:
            floor, last_digest = self.store.floor()
        except StorageError as e:
            self.report_error(f"cannot read the directive floor: {e}")
            return
        verdict = accept_directive(
            envelope,
            truststore=self.trust,
            fleet=self.config.fleet,
            device=self.config.device_id,
            floor=floor,
            accepted_digest=last_digest,
            now=self.clock(),
        )
        if isinstance(verdict, Duplicate):
            log.debug("ignoring the directive already accepted (sequence %d)", verdict.sequence)
            return
        if isinstance(verdict, Refused):
            log.warning("refused directive (sequence %s): %s", verdict.sequence, verdict.reason)
            self.emit_event(
                "directive_refused",
                reason=verdict.reason,
                sequence=verdict.sequence,
                rollout_id=None,
                bundle=None,
                details={"rule": verdict.rule},
            )
            return
        self._accept(verdict, envelope, floor=floor, stop=stop)

    def _accept(
        self,
        accepted: Accepted,
        envelope: bytes,
        *,
        floor: DirectiveFloor,
        stop: threading.Event,
    ) -> None:
        directive = accepted.directive
        ref = directive.bundle
        pointer = self.store.pointer()
        active = self._slot(pointer.active)
        target = BundleId(ref.name, ref.version, ref.sha256)
        base = JournalRecord(
            state="idle",
            sequence=directive.sequence,
            rollout_id=directive.rollout_id,
            bundle=target,
            directive=envelope,
            previous_slot=pointer.active,
        )
        new_floor = accepted.floor
        try:
            if active is not None and active.bundle.sha256 == ref.sha256:
                # Already running it (e.g. a re-issued directive): accept and report committed,
                # once the slot still passes today's trust store and the directive's epoch.
                try:
                    self.store.reverify_slot(
                        active.slot,
                        trust=self.trust,
                        min_security_epoch=new_floor.min_security_epoch,
                    )
                except BundleError as e:
                    self._refuse_active(
                        base, envelope, new_floor, f"bundle refused: {first_line(e)}"
                    )
                    return
                self.record = base.advance("committed", slot=pointer.active)
                self.journal.write(self.record)
                self.store.set_floor(new_floor, directive=envelope)
                self.emit_event("directive_accepted", sequence=directive.sequence)
                self.emit_event("committed", ok=True, sequence=directive.sequence)
                self.emit_event("state", state="committed", sequence=directive.sequence)
                self._publish_status()
                return
            slot = self.store.idle_slot()
            idle = self._slot(slot)
            # The idle slot may still hold the bundle (a rollback directive): `_check`
            # re-verifies it against today's trust store and epoch floor before it serves.
            reuse = (
                idle is not None
                and idle.bundle.sha256 == ref.sha256
                and self.store.has_envelope(slot)
            )
            first = "checking" if reuse else "downloading"
            self.record = base.advance(first, slot=slot)
            self.journal.write(self.record)
            fault_point(f"{first}/journaled")
            self.store.set_floor(new_floor, directive=envelope)
        except StorageError as e:
            self.report_error(f"cannot start the update: {e}; still serving the current model")
            return
        log.info(
            "accepted directive %d: %s %s (%s)",
            directive.sequence,
            ref.name,
            ref.version,
            ref.sha256[:12],
        )
        self.emit_event("directive_accepted", sequence=directive.sequence)
        self.emit_event("state", state=first, sequence=directive.sequence)
        self._publish_status()
        self._continue(stop, directive=directive)

    def _refuse_active(
        self, base: JournalRecord, envelope: bytes, new_floor: DirectiveFloor, reason: str
    ) -> None:
        """A valid directive names the serving bundle, which no longer passes the trust store
        or the directive's epoch: accept the directive (its floor holds), refuse the bundle,
        and keep serving it, since nothing else is verified to serve (`fleet` must send a
        newer bundle)."""
        sequence = base.sequence
        log.error("directive %d names the serving bundle, refused: %s", sequence, reason)
        self.record = base.advance("rolled_back", reason=reason, bundle_at_fault=True)
        self.journal.write(self.record)
        self.store.set_floor(new_floor, directive=envelope)
        if base.bundle is not None:
            self.store.mark_bad(base.bundle.sha256, sequence=sequence, reason=reason)
        self.emit_event("directive_accepted", sequence=sequence)
        self.emit_event("bundle_refused", reason=reason, sequence=sequence, ok=False)
        self.emit_event("state", state="rolled_back", sequence=sequence, reason=reason)
        self.emit_event(
            "rolled_back", ok=False, reason=reason, sequence=sequence, state="rolled_back"
        )
        self._publish_status()

    def _slot(self, slot: str | None) -> SlotInfo | None:
        if slot is None:
            return None
        try:
            return self.store.slot_info(slot)
        except EdgekitError:
            return None

    # -- the pipeline --------------------------------------------------------------------

    def _journaled_directive(self) -> Directive | None:
        """The directive of the update the journal resumes (verified before it was journaled;
        read back only after a restart)."""
        if not self.record.directive:
            return None
        try:
            return Directive.from_payload(parse_envelope(self.record.directive).payload)
        except BundleError as e:
            log.warning("journaled directive is unreadable: %s", first_line(e))
            return None

    def _limits(self) -> Limits:
        cap = self.config.update.max_bundle_bytes
        return Limits(max_file_bytes=cap, max_total_bytes=cap)

    def _continue(self, stop: threading.Event, *, directive: Directive | None) -> None:
        """Drive the journaled update from its current state to committed or rolled back.

        `directive` is the verified directive the update applies (passed on from `_accept`,
        or read back from the journal after a restart).
        """
        candidate: _Candidate | None = None
        staged_here = False  # verified and staged by this process (no need to re-verify)
        installed: SlotInfo | None = None
        try:
            while True:
                state = self.record.state
                if state in ("downloading", "verifying", "installing") and directive is None:
                    raise UpdateFailed(
                        f"journal has no directive to resume {state}", mark_bad=False
                    )
                if state == "downloading":
                    assert directive is not None
                    self._download(directive.bundle, stop)
                    fault_point("downloading/done")
                    self._enter("verifying")
                elif state == "verifying":
                    assert directive is not None
                    if not self.store.download_path(directive.bundle.sha256).exists():
                        self._enter("downloading")  # the download vanished: fetch it again
                        continue
                    self._stage(directive.bundle)
                    staged_here = True
                    fault_point("verifying/done")
                    self._enter("installing")
                elif state == "installing":
                    assert directive is not None
                    installed = self._install(directive.bundle)
                    if installed is None:  # nothing staged survived a restart: verify again
                        self._enter("verifying")
                        continue
                    fault_point("installing/done")
                    self._enter("checking")
                elif state == "checking":
                    candidate = self._check(installed if staged_here else None)
                    fault_point("checking/done")
                    self._enter("activating")
                elif state == "activating":
                    candidate = self._activate(candidate)
                    fault_point("activating/done")
                    restarts = self.record.probation_restarts
                    self._plan = self._plan_probation()
                    window = self.config.update.probation_s
                    self._enter(
                        "probation",
                        probation_restarts=restarts,
                        details=self._plan.details(window),
                    )
                elif state == "probation":
                    self._probation(stop)
                    fault_point("probation/done")
                    self._commit()
                    return
                else:
                    return
                if stop.is_set():
                    return  # resumed from the journal on the next start
        except _Interrupted:
            log.info("stopping mid-update in state %s; the next start resumes", self.record.state)
        except UpdateFailed as e:
            self._fail(e)
        except StorageError as e:
            self.report_error(f"update interrupted: {e}; still serving the current model")
            self._fail(UpdateFailed(f"storage: {first_line(e)}", mark_bad=False))
        except BundleError as e:
            self._fail(UpdateFailed(f"bundle refused: {first_line(e)}", refused=True))
        except Exception as e:
            log.exception("unexpected error in state %s", self.record.state)
            self._fail(UpdateFailed(f"internal error: {first_line(e)}", mark_bad=False))
        finally:
            self.host.set_shadow(None)
            self._previous_runtime = None
            self._plan = None
            self._swapped = False

    def _download(self, ref: BundleRef, stop: threading.Event) -> Path:
        if ref.size_bytes > self.config.update.max_bundle_bytes:
            raise UpdateFailed(
                f"bundle is {ref.size_bytes} bytes; this device accepts at most "
                f"{self.config.update.max_bundle_bytes} (update.max_bundle_bytes)",
                refused=True,
            )
        destination = self.store.download_path(ref.sha256)
        superseded = self._superseded
        deadline = time.monotonic() + self.config.update.download_timeout_s

        def should_stop() -> bool:
            return stop.is_set() or superseded.is_set()

        delay = 1.0
        for attempt in range(1, _DOWNLOAD_ATTEMPTS + 1):
            try:
                path = self.fetcher.fetch(
                    ref, destination, should_stop=should_stop, deadline=deadline
                )
            except OSError as e:
                raise StorageError(
                    f"cannot store the download in {destination.parent}: {e.strerror or e} "
                    "(free space on the data disk?)"
                ) from e
            except TransportError as e:
                if stop.is_set():
                    raise _Interrupted() from e
                if superseded.is_set():
                    raise UpdateFailed(
                        "superseded by a newer directive while downloading", mark_bad=False
                    ) from e
                if attempt == _DOWNLOAD_ATTEMPTS or time.monotonic() >= deadline:
                    raise UpdateFailed(
                        f"download failed after {attempt} attempt(s): {first_line(e)}",
                        mark_bad=False,
                    ) from e
                log.warning("download attempt %d failed: %s", attempt, first_line(e))
                if _wait_any(min(delay, max(0.0, deadline - time.monotonic())), stop, superseded):
                    continue  # the next attempt notices why and ends at once
                delay = min(delay * 2, 30.0)
                continue
            stats = self.fetcher.last
            if stats.source != "local" and (stats.resumed_chunks or stats.resumed_bytes):
                self.emit_event(
                    "download_resumed",
                    sequence=self.record.sequence,
                    details=asdict(stats),
                )
            return path
        raise AssertionError("unreachable")  # pragma: no cover

    def _stage(self, ref: BundleRef) -> SlotInfo:
        """verifying: the one verification of an install, while extracting the download into
        the slot's staging folder; the manifest must match the directive and the profile."""
        slot = self.record.slot
        if slot is None:
            raise UpdateFailed("journal names no slot to install into", mark_bad=False)
        floor, _ = self.store.floor()
        info, verified = self.store.stage(
            slot,
            self.store.download_path(ref.sha256),
            trust=self.trust,
            min_security_epoch=floor.min_security_epoch,
            expected_sha256=ref.sha256,
            limits=self._limits(),
        )
        manifest = verified.manifest
        mismatch = bundle_mismatch(
            name=manifest.name,
            version=manifest.version,
            profile=manifest.profile,
            size_bytes=verified.size_bytes,
            ref=ref,
            device_profile=self.profile.name,
        )
        if mismatch is not None:
            self.store.clear_staging(slot)
            raise UpdateFailed(mismatch, refused=True)
        return info

    def _install(self, ref: BundleRef) -> SlotInfo | None:
        """installing: move the staged bundle into the slot. Idempotent across a restart: if
        the move had happened, the slot holds the bundle; None if neither holds it (it must
        be verified and staged again)."""
        slot = self.record.slot
        if slot is None:
            raise UpdateFailed("journal names no slot to install into", mark_bad=False)
        staged = self.store.staged_info(slot)
        if staged is not None and staged.bundle.sha256 == ref.sha256:
            return self.store.commit_staged(slot)
        held = self.store.slot_info(slot)
        if staged is None and held is not None and held.bundle.sha256 == ref.sha256:
            return held
        return None

    def _check_profile(self, info: SlotInfo) -> None:
        if info.profile != self.profile.name:
            raise UpdateFailed(
                f"bundle is built for profile {info.profile!r}; this device runs "
                f"{self.profile.name!r}",
                refused=True,
            )

    def _health(self, info: SlotInfo) -> HealthReport:
        return run_health_check(
            info,
            budgets=self.budgets,
            tolerance=self.profile.health_check,
            latency_runs=self.config.update.latency_runs,
            threads=self.config.update.threads,
            limits=self.inference_limits,
        )

    def _check(self, installed: SlotInfo | None) -> _Candidate:
        """checking: the health check. `installed` is the slot this process just verified
        and installed; otherwise (a reused slot installed long ago, or a restart) the slot is
        re-hashed and its kept signatures and epoch re-checked against today's trust store
        and floor first."""
        slot = self.record.slot
        if slot is None:
            raise UpdateFailed("journal names no slot to check", mark_bad=False)
        info = installed
        if info is None:
            floor, _ = self.store.floor()
            info = self.store.reverify_slot(
                slot, trust=self.trust, min_security_epoch=floor.min_security_epoch
            )
            self._check_profile(info)
        if self.record.bundle is not None and info.bundle.sha256 != self.record.bundle.sha256:
            raise UpdateFailed(f"slot {slot} holds another bundle than the directive names")
        fault_point("checking/health")
        report = self._health(info)
        self.emit_event(
            "health_check",
            ok=report.ok,
            reason=report.reason or None,
            sequence=self.record.sequence,
            details=report.details(),
        )
        if not report.ok or report.runtime is None:
            raise UpdateFailed(f"health check failed: {report.reason}")
        return _Candidate(info, report.runtime)

    def _activate(self, candidate: _Candidate | None) -> _Candidate:
        slot = self.record.slot
        if slot is None:
            raise UpdateFailed("journal names no slot to activate", mark_bad=False)
        if candidate is None:  # resumed after a restart: load the checked slot again
            info = self.store.verify_slot(slot)
            try:
                candidate = _Candidate(info, open_runtime(info.model_path))
            except EdgekitError as e:
                raise UpdateFailed(f"cannot load the new model: {first_line(e)}") from e
        active = self.host.bundle
        swap = active is None or active.sha256 != candidate.slot.bundle.sha256
        if swap:
            # Before the swap takes effect: the serving model's statistics are the baseline a
            # probation resumed after a restart judges against.
            self._save_baseline(candidate.slot)
        pointer = self.store.pointer()
        if pointer.active != slot:
            self.store.set_pointer(Pointer(slot, pointer.active))
        fault_point("activating/pointer")
        if swap:
            self._previous_runtime = self._serving
            self._activate_host(candidate.slot, candidate.runtime)
            self._swapped = True
        return candidate

    # -- probation -----------------------------------------------------------------------

    def _save_baseline(self, slot: SlotInfo) -> None:
        serving = self.host.since_activation() if self.host.bundle is not None else None
        document = {
            "schema": PROBATION_SCHEMA,
            "sequence": self.record.sequence,
            "bundle_sha256": slot.bundle.sha256,
            "baseline": serving.to_dict() if serving is not None and serving.requests else None,
            "window_s": self.config.update.probation_s,
            "observed_s": 0.0,
            "ts": time.time(),
        }
        self.store.set_probation(document)

    def _load_probation(self) -> dict[str, Any] | None:
        """This update's probation record, None if missing, corrupt or another update's."""
        try:
            document = self.store.probation()
        except StorageError as e:
            log.warning("ignoring the probation record: %s", first_line(e))
            return None
        bundle = self.record.bundle
        if (
            document is None
            or document.get("schema") != PROBATION_SCHEMA
            or document.get("sequence") != self.record.sequence
            or bundle is None
            or document.get("bundle_sha256") != bundle.sha256
        ):
            return None
        return document

    def _clear_probation(self) -> None:
        try:
            self.store.clear_probation()
        except StorageError as e:
            log.warning("%s", first_line(e))

    def _plan_probation(self) -> _ProbationPlan:
        settings = self.config.update
        document = self._load_probation()
        resumed = not self._swapped
        persisted = _snapshot_from(document.get("baseline")) if document else None
        live = None if resumed else self.host.previous_snapshot()
        baseline = live or persisted
        source = None if baseline is None else ("live" if live is not None else "persisted")
        observed = 0.0
        if resumed and document is not None:
            value = document.get("observed_s", 0.0)
            observed = float(value) if isinstance(value, int | float) else 0.0
        window = settings.probation_s
        remaining = remaining_probation_s(window, observed) if resumed else window
        shadow = settings.shadow and self._previous_runtime is not None
        note = None
        if settings.shadow and not shadow:
            note = (
                "shadow comparison is off after a restart (the previous model is not loaded)"
                if resumed
                else "shadow comparison is off: no previous model serves"
            )
        if document is None:
            bundle = self.record.bundle
            document = {
                "schema": PROBATION_SCHEMA,
                "sequence": self.record.sequence,
                "bundle_sha256": bundle.sha256 if bundle else None,
                "baseline": None,
                "window_s": window,
                "observed_s": 0.0,
                "ts": time.time(),
            }
        return _ProbationPlan(
            document=document,
            resumed=resumed,
            remaining_s=remaining,
            observed_s=min(observed, window),
            baseline=baseline,
            baseline_source=source,
            shadow=shadow,
            shadow_note=note,
        )

    def _checkpoint(self, plan: _ProbationPlan, observed_s: float) -> None:
        """Record the probation time observed so far (a restart resumes from it)."""
        document = dict(plan.document, observed_s=round(observed_s, 3), ts=time.time())
        try:
            self.store.set_probation(document)
            plan.document = document
        except StorageError as e:
            log.warning("cannot checkpoint probation: %s", first_line(e))

    def _probation(self, stop: threading.Event) -> None:
        settings = self.config.update
        plan = self._plan
        if plan is None:  # resumed after a restart: report how it resumes
            plan = self._plan = self._plan_probation()
            log.info(
                "resuming probation: %.1f s left, baseline %s",
                plan.remaining_s,
                plan.baseline_source or "none",
            )
            self.emit_event(
                "state",
                state="probation",
                sequence=self.record.sequence,
                details=plan.details(settings.probation_s),
            )
            self._publish_status()
        if plan.shadow:
            self.host.set_shadow(self._previous_runtime, tolerance=self.host.previous_tolerance)
        interval = min(_CHECKPOINT_MAX_S, max(_CHECKPOINT_MIN_S, settings.probation_s / 20))
        start = time.monotonic()
        deadline = start + plan.remaining_s
        next_checkpoint = start
        while True:
            now = time.monotonic()
            if now >= next_checkpoint:
                self._checkpoint(plan, min(settings.probation_s, plan.observed_s + now - start))
                next_checkpoint = now + interval
            if now >= deadline:
                break
            if stop.wait(min(0.2, max(0.0, deadline - now))):
                raise _Interrupted()
            self._judge(final=False)
        if plan.shadow:
            self.host.wait_shadow_idle(timeout_s=5.0)
        self._judge(final=True)

    def _judge(self, *, final: bool) -> None:
        settings = self.config.update
        snapshot = self.host.since_activation()
        enough = snapshot.requests >= max(1, settings.min_probation_requests)
        if enough and snapshot.error_ratio > settings.max_error_ratio:
            raise UpdateFailed(
                f"runtime error ratio {snapshot.error_ratio:.3f} over {snapshot.requests} "
                f"requests exceeds {settings.max_error_ratio:g}"
            )
        if not final:
            return
        plan = self._plan
        baseline = plan.baseline if plan is not None else self.host.previous_snapshot()
        if (
            enough
            and baseline is not None
            and baseline.requests >= max(1, settings.min_probation_requests)
            and baseline.p95_ms
            and snapshot.p95_ms
        ):
            ratio = snapshot.p95_ms / baseline.p95_ms
            if ratio > settings.max_latency_regression:
                raise UpdateFailed(
                    f"p95 latency {snapshot.p95_ms:.2f} ms is {ratio:.2f}x the previous "
                    f"model's {baseline.p95_ms:.2f} ms (limit {settings.max_latency_regression:g}x)"
                )
        shadowing = plan.shadow if plan is not None else settings.shadow
        report = self.host.shadow_report() if shadowing else None
        if report is not None and report.compared >= max(1, settings.min_probation_requests):
            agreement = report.agreement_ratio or 0.0
            if agreement < settings.shadow_agreement:
                raise UpdateFailed(
                    f"shadow agreement {agreement:.3f} over {report.compared} requests is below "
                    f"{settings.shadow_agreement:g}"
                )

    def _commit(self) -> None:
        self._enter("committed", reason=None)
        self._clear_probation()
        self.emit_event("committed", ok=True, sequence=self.record.sequence)
        bundle = self.record.bundle
        try:
            self.store.clean_downloads(keep=None)
        except OSError as e:
            log.warning("cannot clean downloads: %s", first_line(e))
        log.info("committed %s", f"{bundle.name} {bundle.version}" if bundle else "")

    def _fail(self, failure: UpdateFailed) -> None:
        """Roll back: journal (the decision, durable first), mark the bundle bad, pointer
        back, host back to the previous model. A restart at any step finishes the rollback
        from the journal (`_recover_pointer`)."""
        record = self.record
        reason = failure.reason
        log.error("update to sequence %d failed: %s", record.sequence, reason)
        if failure.refused:
            self.emit_event("bundle_refused", reason=reason, sequence=record.sequence, ok=False)
        try:
            self._enter("rolled_back", reason=reason, bundle_at_fault=failure.mark_bad)
            fault_point("rolled_back/decided")
            if failure.mark_bad and record.bundle is not None:
                self.store.mark_bad(record.bundle.sha256, sequence=record.sequence, reason=reason)
            self._clear_probation()
            pointer = self.store.pointer()
            if record.slot is not None and pointer.active == record.slot:
                self.store.set_pointer(Pointer(record.previous_slot, record.slot))
            fault_point("rolled_back/pointer")
        except StorageError as e:
            self.report_error(f"cannot journal the rollback: {e}")
        self._restore_host(record)
        if record.slot is not None:
            self.store.clear_staging(record.slot)
            held = self._slot(record.slot)
            if (
                failure.refused
                and held is not None
                and record.bundle is not None
                and held.bundle.sha256 == record.bundle.sha256
                and self.store.pointer().active != record.slot
            ):
                self.store.clear_slot(record.slot)  # refused: its files must not be reused
        self.emit_event(
            "rolled_back", ok=False, reason=reason, sequence=record.sequence, state="rolled_back"
        )
        self._publish_status()

    def _restore_host(self, record: JournalRecord) -> None:
        previous = record.previous_slot
        serving = self.host.bundle
        if record.bundle is None or serving is None or serving.sha256 != record.bundle.sha256:
            return  # the failed bundle never served
        runtime = self._previous_runtime
        slot = self._slot(previous)
        if slot is None:
            log.error("no previous model to roll back to; the failed model keeps serving")
            return
        if runtime is None:
            try:
                runtime = open_runtime(slot.model_path, threads=self.config.update.threads)
            except EdgekitError as e:
                self.report_error(f"cannot reload the previous model: {first_line(e)}")
                return
        self._activate_host(slot, runtime)


class _Interrupted(UpdateFailed):
    """The agent is stopping: leave the journal as it is, the next start resumes."""

    def __init__(self) -> None:
        super().__init__("agent stopping", mark_bad=False)


def _wait_any(seconds: float, *events: threading.Event) -> bool:
    """Wait up to `seconds` for any of `events`; True if one is set."""
    deadline = time.monotonic() + seconds
    while True:
        if any(event.is_set() for event in events):
            return True
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False
        events[0].wait(min(0.1, remaining))
