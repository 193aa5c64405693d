"""Device side: TUF updates into A/B slots, health check, commit, probation, rollback.

A device is a state folder::

    STATE/device.json       marks the folder as an edgeloop device
    STATE/tuf/              python-tuf's trusted metadata (root chain, timestamp, ...)
    STATE/slots/a|b/model.onnx
    STATE/pointer.json      which slot serves and what each holds (see slots.py)
    STATE/history.jsonl     when and why every change happened
    STATE/golden.npz        optional golden set for health checks
    STATE/lock              flock'ed around every read-modify-write of the pointer
    STATE/telemetry.key     the device's telemetry id and HMAC key (0600; see
                            edgeloop.monitor.telemetry.client, which keeps its other files)

The updater and the runtimes may be different processes: every change to the pointer
re-reads it under ``STATE/lock``, so no writer reverts another's change.

This module is the thin layer that touches disk and network; the decisions it acts on
are the pure functions of :mod:`~edgeloop.bundle.manifest`, :mod:`~edgeloop.bundle.health`
and :mod:`~edgeloop.bundle.slots`.

Offline devices and expired metadata: serving never consults TUF metadata. The active
model was verified when it was installed, and every start checks its sha256 against the
pointer, so a device that cannot reach its repository, or whose metadata has expired,
keeps serving its current model (a start that finds the active file corrupt or missing
falls back to the other slot if that one verifies). An update needs fresh metadata:
python-tuf refuses an expired timestamp, snapshot, targets or root (whether cached or
served), so nothing is installed until the repository serves unexpired metadata signed by
trusted keys; the update fails with a one-line error and the device state is left as it
was.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import threading
import time
from array import array
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
from tuf.api import exceptions as tuf_exc
from tuf.api.metadata import Metadata, Root
from tuf.ngclient import Updater

from edgeloop._io import atomic_path, locked, sha256_file, utc_now, write_bytes_atomic
from edgeloop.bundle._crash import crash_point
from edgeloop.bundle.health import HealthConfig, Measured, Probation, Verdict, judge
from edgeloop.bundle.health import probation_step as _step
from edgeloop.bundle.manifest import (
    BundleFile,
    Manifest,
    check_file_bytes,
    check_model_bytes,
    check_newer,
    golden_digest,
)
from edgeloop.bundle.repository import manifest_target
from edgeloop.bundle.served import Served, served, served_latency
from edgeloop.bundle.slots import (
    SLOTS,
    Event,
    SlotState,
    begin_install,
    commit,
    fall_back,
    keep_known_good,
    refused,
    rollback,
)
from edgeloop.data import Dataset, check_against, load_npz, save_npz
from edgeloop.errors import (
    EdgeloopError,
    TransportError,
    UsageError,
    VerificationError,
)
from edgeloop.measure import predict, top1_accuracy

__all__ = ["Adapt", "Device", "UpdateResult", "Watch", "boot_id"]

Adapt = Callable[[Path, Manifest, Mapping[str, Path]], Manifest]
"""How :meth:`Device.update` lets a caller rewrite a verified candidate (see there)."""

_MARKER = "device.json"
_LOCK = "lock"
_BOOT_ID = Path("/proc/sys/kernel/random/boot_id")
_TUF_WORDS = {
    tuf_exc.UnsignedMetadataError: "metadata not signed by the trusted keys",
    tuf_exc.BadVersionNumberError: "metadata version rolled back or mixed",
    tuf_exc.ExpiredMetadataError: "metadata expired (freeze attack or offline repository)",
    tuf_exc.LengthOrHashMismatchError: "a file does not match its signed length or hash",
    tuf_exc.DownloadLengthMismatchError: "a file is longer than its signed length",
}


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def boot_id() -> str:
    """An id of the device's current boot: the same in every process until it reboots.

    Linux gives one (``/proc/sys/kernel/random/boot_id``). Elsewhere it is the boot time
    (wall clock minus the monotonic clock) to the minute, so a clock step across a minute
    boundary, or a monotonic clock that stops during sleep, counts as one more boot.
    """
    try:
        return _BOOT_ID.read_text().strip()
    except OSError:
        return f"booted-at-minute-{round((time.time() - time.monotonic()) / 60)}"


@dataclass(frozen=True)
class UpdateResult:
    """What :meth:`Device.update` did: ``installed`` a version, or why it did not."""

    installed: bool
    version: str | None
    reason: str
    verdict: Verdict | None = None


class Device:
    """One device's state folder. ``__init__`` only stores its arguments."""

    def __init__(self, state_dir: str | os.PathLike[str], *,
                 config: HealthConfig | None = None) -> None:
        self.dir = Path(state_dir)
        self.config = config or HealthConfig()

    # --- provisioning and state -----------------------------------------------------

    @classmethod
    def init(cls, state_dir: str | os.PathLike[str], *, trusted_root: str | os.PathLike[str],
             golden: str | os.PathLike[str] | None = None,
             config: HealthConfig | None = None) -> Device:
        """Provision a new device folder that trusts ``trusted_root`` (a TUF root.json)."""
        d = Path(state_dir)
        if (d / _MARKER).exists():
            raise UsageError(f"{str(d)!r} is already a device; refusing to re-provision it")
        if d.exists() and any(d.iterdir()):
            raise UsageError(f"{str(d)!r} is not empty; give a new or empty folder")
        root_path = Path(trusted_root)
        if not root_path.is_file():
            raise UsageError(f"trusted root {str(root_path)!r} does not exist")
        data = root_path.read_bytes()
        try:
            md = Metadata[Root].from_bytes(data)
            if not isinstance(md.signed, Root):
                raise ValueError("not root metadata")
            md.verify_delegate(Root.type, md)
        except Exception as e:  # tuf raises DeserializationError, UnsignedMetadataError, ...
            raise VerificationError(f"trusted root {str(root_path)!r} is not valid signed TUF "
                                    f"root metadata ({type(e).__name__})") from None
        golden_data = load_npz(golden) if golden is not None else None
        (d / "tuf").mkdir(parents=True, exist_ok=True)
        (d / "slots" / "a").mkdir(parents=True, exist_ok=True)
        (d / "slots" / "b").mkdir(parents=True, exist_ok=True)
        write_bytes_atomic(d / "tuf" / "root.json", data)
        if golden_data is not None:
            save_npz(d / "golden.npz", golden_data)
        dev = cls(d, config=config)
        dev._write_state(SlotState())
        from edgeloop.monitor.telemetry.client import create_key  # httpx: only here

        create_key(d)   # the telemetry key; the collector enrolls a copy
        write_bytes_atomic(d / _MARKER, json.dumps({"format": 1, "created": utc_now()}).encode())
        dev._record("init", None, f"trusting root version {md.signed.version}")
        return dev

    def _check(self) -> None:
        if not (self.dir / _MARKER).is_file():
            raise UsageError(f"{str(self.dir)!r} is not a device state folder (no {_MARKER}); "
                             "create one with `edgeloop device init`")

    def state(self) -> SlotState:
        """The pointer: active slot, what each slot holds, probation."""
        self._check()
        try:
            return SlotState.from_bytes((self.dir / "pointer.json").read_bytes())
        except OSError:
            raise VerificationError(f"device {str(self.dir)!r} has no readable pointer.json"
                                    ) from None

    def _write_state(self, state: SlotState) -> None:
        write_bytes_atomic(self.dir / "pointer.json", state.to_bytes())
        _fsync_dir(self.dir)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """Hold the device lock (flock on ``STATE/lock``, across processes) for a
        read-modify-write of the pointer. Not re-entrant: never nest two."""
        self._check()
        with locked(self.dir / _LOCK):
            yield

    def _record(self, action: str, version: str | None, reason: str) -> None:
        line = json.dumps(asdict(Event(utc_now(), action, version, reason))) + "\n"
        with open(self.dir / "history.jsonl", "a") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())

    def history(self) -> list[Event]:
        """Every recorded change, oldest first."""
        self._check()
        path = self.dir / "history.jsonl"
        if not path.is_file():
            return []
        events = []
        for line in path.read_text().splitlines():
            with contextlib.suppress(ValueError, TypeError):  # a line cut by power loss
                events.append(Event(**json.loads(line)))
        return events

    def model_path(self, slot: str) -> Path:
        """Where ``slot``'s model file lives."""
        return self.dir / "slots" / slot / "model.onnx"

    def _verified(self, state: SlotState, slot: str) -> tuple[Path, Manifest]:
        """``slot``'s model path and manifest; raise :class:`VerificationError` unless the
        model file and the bundle's other files are there and match the manifest's sha256
        and size."""
        manifest = state.manifest(slot)
        if manifest is None:
            raise VerificationError(f"slot {slot} holds no model")
        path = self.model_path(slot)
        if not path.is_file():
            raise VerificationError(f"model file {str(path)!r} of {manifest.name} "
                                    f"{manifest.version} is missing")
        check_model_bytes(manifest, sha256_file(path), path.stat().st_size)
        for f in manifest.files:
            fp = path.with_name(f.name)
            if not fp.is_file():
                raise VerificationError(f"file {str(fp)!r} of {manifest.name} "
                                        f"{manifest.version} is missing")
            check_file_bytes(manifest, f, sha256_file(fp), fp.stat().st_size)
        return path, manifest

    def active(self) -> tuple[Path, Manifest] | None:
        """The active model's path and manifest after checking its sha256, or None when
        nothing is installed. Raises :class:`VerificationError` if the file does not match."""
        state = self.state()
        return None if state.active is None else self._verified(state, state.active)

    def status(self) -> dict[str, object]:
        """Both slots (version, sha256, active), probation and the history, as a dict."""
        state = self.state()
        slots = []
        for s in SLOTS:
            m = state.manifest(s)
            slots.append({"slot": s, "active": s == state.active,
                          "name": m.name if m else None, "version": m.version if m else None,
                          "sha256": m.sha256 if m else None})
        return {"state_dir": str(self.dir), "active": state.active, "slots": slots,
                "probation": asdict(state.probation) if state.probation else None,
                "history": [asdict(e) for e in self.history()]}

    # --- health ---------------------------------------------------------------------

    def golden(self) -> Dataset | None:
        """The device's golden set (``STATE/golden.npz``), or None if it has none."""
        path = self.dir / "golden.npz"
        return load_npz(path) if path.is_file() else None

    def measure(self, candidate: Path, manifest: Manifest,
                current: tuple[Path, Manifest] | None, *,
                files: Mapping[str, Path] | None = None) -> Measured:
        """Measure the candidate bundle (model ``candidate``, its other ``files`` by slot
        name) and the ``current`` one (its model path and manifest) on the golden set, as
        each is served (:func:`~edgeloop.bundle.served.served`: a cascade as a cascade):
        accuracy (or agreement with the publisher's predictions), and batch-1 latency p50
        of both, timed in turns over the same samples
        (:func:`~edgeloop.bundle.served.served_latency`)."""
        golden = self.golden()
        work = self.dir / "download"        # the links of bundles being measured
        work.mkdir(exist_ok=True)
        with contextlib.ExitStack() as stack:
            try:
                cand = stack.enter_context(served(candidate, files or {}, workdir=work))
                if golden is None:
                    cand.answer({s.name: np.zeros([1 if d is None else d for d in s.shape],
                                                  s.dtype) for s in cand.inputs})
                    return Measured(reference_note="no golden set on this device")
                check_against(golden, cand.inputs, source="the device's golden set")
                outputs = predict(cand.answer, golden)
            except EdgeloopError as e:
                return Measured(load_error=f"candidate failed on the device: {e}")
            bundles, current_accuracy = [cand], None
            recent: dict[str, float | int | None] = {}
            if current is not None:
                path, m = current
                with contextlib.suppress(EdgeloopError):
                    cur = stack.enter_context(served(
                        path, {f.name: path.with_name(f.name) for f in m.files}, workdir=work))
                    check_against(golden, cur.inputs, source="the device's golden set")
                    if golden.labels is not None:
                        current_accuracy = top1_accuracy(predict(cur.answer, golden),
                                                         golden.labels)
                    bundles.append(cur)
                    recent = self._on_recent(cand, (cur, path, m), files or {})
            c = self.config
            p50 = served_latency(bundles, golden, rounds=c.latency_rounds,
                                 runs=c.latency_runs, warmup=3)
        accuracy = agreement = note = None
        ref = manifest.reference
        if golden.labels is not None:
            accuracy = top1_accuracy(outputs, golden.labels)
        elif ref is None:
            note = "golden set has no labels and the manifest records no reference predictions"
        elif ref.golden_sha256 != golden_digest(golden):
            note = "golden set has no labels and differs from the publisher's"
        else:
            agreement = top1_accuracy(outputs, np.asarray(ref.top1))
        return Measured(accuracy=accuracy, agreement=agreement, reference_note=note,
                        latency_p50_ms=p50[0], current_accuracy=current_accuracy,
                        current_latency_p50_ms=p50[1] if len(p50) > 1 else None,
                        **recent)  # type: ignore[arg-type]

    def _on_recent(self, cand: Served, current: tuple[Served, Path, Manifest],
                   files: Mapping[str, Path]) -> dict[str, float | int | None]:
        """While the monitor flags the device as drifted under the current model: both
        bundles' label-free accuracy estimates on the recent inputs it saved
        (:mod:`edgeloop.monitor.gate`; empty when not drifted or either bundle ships no
        calibration). Raises :class:`EdgeloopError` if the inputs do not fit."""
        from edgeloop.monitor.alerts import REFERENCE_FILE
        from edgeloop.monitor.gate import drifted_recent, estimate_accuracy

        cur, path, manifest = current
        data = drifted_recent(self.dir, manifest.sha256)
        if data is None:
            return {}
        check_against(data, cand.inputs, source="the device's recent inputs")
        new = estimate_accuracy(cand.answer, data, files.get(REFERENCE_FILE))
        old = estimate_accuracy(cur.answer, data, path.with_name(REFERENCE_FILE) if any(
            f.name == REFERENCE_FILE for f in manifest.files) else None)
        if new is None or old is None:
            return {}
        return {"recent_samples": len(data), "recent_estimate": new,
                "current_recent_estimate": old}

    # --- update ---------------------------------------------------------------------

    @contextlib.contextmanager
    def _tuf_errors(self, repo: str, serving: str) -> Iterator[None]:
        try:
            yield
        except (tuf_exc.RepositoryError, tuf_exc.DownloadLengthMismatchError) as e:
            words = next((w for t, w in _TUF_WORDS.items() if isinstance(e, t)),
                         "metadata failed verification")
            raise VerificationError(f"update rejected: {words} ({type(e).__name__}: "
                                    f"{str(e)[:200]}); still serving {serving}") from None
        except tuf_exc.DownloadError as e:
            cause = e.__cause__ or e.__context__
            detail = str(e) + (f": {cause}" if cause else "")
            raise TransportError(f"repository {repo} could not be reached ({detail[:200]}); "
                                 f"still serving {serving}") from None
        except ValueError as e:  # ngclient's own argument/JSON errors from corrupt caches
            raise VerificationError(f"update rejected: {str(e)[:200]}; still serving "
                                    f"{serving}") from None

    def update(self, repo: str, name: str, *, adapt: Adapt | None = None) -> UpdateResult:
        """Fetch, verify, health-check and commit the newest ``name`` from ``repo`` (the
        repository's base URL). Raises :class:`VerificationError` when the update is
        rejected or fails its health check, and while the active model is on probation
        with the last known-good model in the other slot (the slot an install would
        overwrite); the current model keeps serving either way.

        ``adapt`` may rewrite the verified candidate before its health check (a device
        combining a published body with its own head): it gets the candidate model's
        path, the manifest and the bundle's other files by name, and returns the manifest
        of what it wrote (sha256 and size of the new file); the health check and the
        pointer then judge and record that."""
        state = self.state()
        current = state.current()
        serving = f"{current.name} {current.version}" if current else "nothing (no model yet)"
        base = repo.rstrip("/")
        if not base.startswith(("http://", "https://")):
            raise UsageError(f"`repo` must be an http(s) URL; got {repo!r}")
        dl = self.dir / "download"
        shutil.rmtree(dl, ignore_errors=True)
        dl.mkdir()
        with self._tuf_errors(base, serving):
            try:
                updater = Updater(str(self.dir / "tuf"), f"{base}/metadata/", str(dl),
                                  f"{base}/targets/", bootstrap=None)
            except OSError:
                raise VerificationError(f"device {str(self.dir)!r} has no readable trusted "
                                        "root (tuf/root.json)") from None
            updater.refresh()
            info = updater.get_targetinfo(manifest_target(name))
            if info is None:
                raise UsageError(f"{name!r} is not published in {base}")
            manifest = Manifest.from_bytes(Path(updater.download_target(info)).read_bytes())
            if manifest.name != name:
                raise VerificationError(f"manifest published as {name!r} names {manifest.name!r}")
            if not check_newer(current.version if current else None, manifest.version):
                return UpdateResult(False, manifest.version, f"already at {manifest.version}")
            seen = refused(self.history(), manifest.version)
            if seen is not None:
                return UpdateResult(False, manifest.version,
                                    f"{manifest.version} was refused on this device at "
                                    f"{seen.time} ({seen.reason}); publish a newer version")
            keep_known_good(state, f"{name} {manifest.version}")
            model_info = updater.get_targetinfo(manifest.model_target)
            if model_info is None:
                raise VerificationError(f"manifest names {manifest.model_target!r}, which the "
                                        "signed targets metadata does not list")
            check_model_bytes(manifest, model_info.hashes.get("sha256", ""), model_info.length)

            # the candidate lands beside the inactive slot's model, which stays intact
            # (and available for rollback) until the candidate has passed its checks
            slot = state.target_slot()
            final = self.model_path(slot)
            candidate = final.with_name("candidate.onnx")
            part = final.with_name(".candidate.onnx.part")
            candidate.unlink(missing_ok=True)     # left by an update that was cut short
            crash_point("slot-write")
            updater.download_target(model_info, filepath=str(part))
            extra = self._download_files(updater, manifest, final.parent)
        with open(part, "rb+") as f:
            os.fsync(f.fileno())
        crash_point("slot-written")
        os.replace(part, candidate)
        crash_point("verify")
        check_model_bytes(manifest, sha256_file(candidate), candidate.stat().st_size)
        for f, cand in extra:
            check_file_bytes(manifest, f, sha256_file(cand), cand.stat().st_size)
        if adapt is not None:
            manifest = adapt(candidate, manifest, {f.name: cand for f, cand in extra})
        return self._install(state, candidate, manifest, extra, serving)

    def install_local(self, model: str | os.PathLike[str], manifest: Manifest, *,
                      files: Mapping[str, str | os.PathLike[str]], action: str
                      ) -> UpdateResult:
        """Install a model made on this device (``model``, described by ``manifest``, its
        other ``files`` by name) into the inactive slot through the same health check,
        commit and probation as :meth:`update`; the history records ``action`` (or
        ``action-rejected``), so a version this refuses stays installable from the
        repository. Raises :class:`VerificationError` if the health check fails; the
        current model keeps serving."""
        state = self.state()
        current = state.current()
        serving = f"{current.name} {current.version}" if current else "nothing (no model yet)"
        keep_known_good(state, f"{manifest.name} {manifest.version} ({action})")
        slot_dir = self.model_path(state.target_slot()).parent
        given = {f.name: Path(files[f.name]) for f in manifest.files}
        copies = [(Path(model), slot_dir / "candidate.onnx")] + [
            (given[f.name], slot_dir / f"candidate.{f.name}") for f in manifest.files]
        for src, dest in copies:
            with atomic_path(dest) as tmp:
                shutil.copyfile(src, tmp)
        candidate = copies[0][1]
        check_model_bytes(manifest, sha256_file(candidate), candidate.stat().st_size)
        extra = [(f, dest) for f, (_, dest) in zip(manifest.files, copies[1:], strict=True)]
        for f, cand in extra:
            check_file_bytes(manifest, f, sha256_file(cand), cand.stat().st_size)
        return self._install(state, candidate, manifest, extra, serving, action=action)

    def _install(self, state: SlotState, candidate: Path, manifest: Manifest,
                 extra: list[tuple[BundleFile, Path]], serving: str, *,
                 action: str | None = None) -> UpdateResult:
        """Health-check the verified ``candidate`` (beside the inactive slot's model, with
        its ``extra`` files) against what ``state`` serves; commit it on probation, or
        remove it and raise. ``action``: a local install's name in the history."""
        current = state.current()
        name = manifest.name
        final = self.model_path(state.target_slot())
        serving_now = (self.model_path(state.active), current) \
            if current is not None and state.active is not None else None
        measured = self.measure(candidate, manifest, serving_now,
                                files={f.name: cand for f, cand in extra})
        verdict = judge(manifest.floor, measured, self.config)
        if not verdict.ok:
            candidate.unlink()
            for _, cand in extra:
                cand.unlink(missing_ok=True)
            # a latency-only failure may be one slow measurement: reject this attempt only
            failed, later = ("deferred", "; a later update tries it again") if verdict.retry \
                else ("rejected", "")
            if action is not None:
                failed, later = f"{action}-rejected", ""
            self._record(failed, manifest.version, f"health check failed: {verdict.reason}")
            raise VerificationError(f"{name} {manifest.version}"
                                    f"{f' ({action})' if action else ''} failed its health "
                                    f"check ({verdict.reason}){later}; still serving {serving}")
        with self._locked():
            now = self.state()
            if (now.active, now.slots) != (state.active, state.slots):
                candidate.unlink()
                for _, cand in extra:
                    cand.unlink(missing_ok=True)
                raise VerificationError(f"the device changed during the update of {name} "
                                        f"(a rollback or another update); nothing installed")
            state = begin_install(now)
            self._write_state(state)
            os.replace(candidate, final)
            for f, cand in extra:
                os.replace(cand, final.with_name(f.name))
            _fsync_dir(final.parent)
            crash_point("pointer-switch")
            probation = Probation(remaining=self.config.probation_inferences,
                                  baseline_p50_ms=measured.current_latency_p50_ms,
                                  boot_id=boot_id())
            self._write_state(commit(state, manifest, probation))
            crash_point("committed")
            self._record(action or "commit", manifest.version, f"health check {verdict.reason}")
        return UpdateResult(True, manifest.version, verdict.reason, verdict)

    def _download_files(self, updater: Updater, manifest: Manifest, slot_dir: Path
                        ) -> list[tuple[BundleFile, Path]]:
        """Download the bundle's other files beside the inactive slot's, as
        ``candidate.NAME`` (fsync'ed); the slot's current files stay intact until the
        commit replaces them."""
        out = []
        for f in manifest.files:
            info = updater.get_targetinfo(f.target)
            if info is None:
                raise VerificationError(f"manifest names {f.target!r}, which the signed "
                                        "targets metadata does not list")
            check_file_bytes(manifest, f, info.hashes.get("sha256", ""), info.length)
            cand = slot_dir / f"candidate.{f.name}"
            part = slot_dir / f".candidate.{f.name}.part"
            cand.unlink(missing_ok=True)
            updater.download_target(info, filepath=str(part))
            with open(part, "rb+") as fh:
                os.fsync(fh.fileno())
            os.replace(part, cand)
            out.append((f, cand))
        return out

    def rollback(self, reason: str = "rolled back by hand") -> Manifest:
        """Serve the other slot's model again; returns its manifest."""
        with self._locked():
            return self._rollback(self.state(), reason)

    def _rollback(self, state: SlotState, reason: str) -> Manifest:
        """:meth:`rollback` from ``state``, read by the caller under the device lock."""
        before = state.current()
        new = rollback(state)
        _, target = self._verified(new, new.active)  # type: ignore[arg-type]
        self._write_state(new)
        self._record("rollback", before.version if before else None,
                     f"{reason}; now serving {target.version}")
        return target

    def _fail(self, state: SlotState, reason: str) -> bool:
        """Roll back after a failed probation, or keep the model if there is nothing to
        go back to (the first install); True if it rolled back. Under the device lock."""
        try:
            self._rollback(state, f"probation failed: {reason}")
        except VerificationError as e:
            self._write_state(replace(state, probation=None))
            self._record("kept", state.current().version,  # type: ignore[union-attr]
                         f"probation failed ({reason}) but {e}")
            return False
        return True

    def serve(self) -> tuple[Path, Manifest, Watch | None]:
        """What a starting runtime (:class:`edgeloop.device.Runtime`) serves: the active
        model's path and manifest, and the watch it reports to while on probation.

        The start is accounted first, under the device lock: an active file that does
        not match its manifest falls back to the other slot if that one verifies (the
        corrupt slot is marked empty and the history says why), and a start in a new
        device boot counts towards probation, which may roll back. A verified model off
        probation starts without the lock and without writing.
        """
        state = self.state()
        if state.probation is None and state.active is not None:
            with contextlib.suppress(VerificationError):
                return (*self._verified(state, state.active), None)
        with self._locked():
            state = self.state()
            if state.active is None:
                raise UsageError(f"device {str(self.dir)!r} has no model installed yet; run "
                                 "`edgeloop device update`")
            try:
                path, manifest = self._verified(state, state.active)
            except VerificationError as e:
                state, path, manifest = self._fall_back(state, e)
            if state.probation is not None:
                p, reason = _step(state.probation, self.config, boot_id=boot_id())
                if reason:
                    self._fail(replace(state, probation=p), reason)
                    state = self.state()
                    path, manifest = self._verified(state, state.active)  # type: ignore[arg-type]
                elif p != state.probation:
                    state = replace(state, probation=p)
                    self._write_state(state)
        watch = None if state.probation is None else Watch(self, state, state.probation)
        return path, manifest, watch

    def _fall_back(self, state: SlotState, error: VerificationError
                   ) -> tuple[SlotState, Path, Manifest]:
        """Serve the other slot instead of the corrupt active one, if it verifies."""
        bad = state.current()
        assert bad is not None and state.active is not None
        try:
            new = fall_back(state)
            path, manifest = self._verified(new, new.active)  # type: ignore[arg-type]
        except VerificationError as e:
            raise VerificationError(f"{error}; cannot fall back: {e}") from None
        self._write_state(new)
        self._record("corrupt", bad.version, f"{error}; slot {state.active} marked empty, "
                                             f"now serving {manifest.version}")
        return new, path, manifest


class Watch:
    """The updater's side of one runtime's probation.

    The runtime reports every inference; outcomes wait in memory and are merged into the
    pointer under the device lock when :class:`HealthConfig`'s ``probation_save_*``
    count or time is reached, at a model error, when the verdict is due and when the
    runtime goes away (a process per request still advances probation; a killed process
    loses at most its unsaved outcomes). The merge re-reads the pointer, so what other
    processes wrote meanwhile is kept: counts from other runtimes add up, and after an
    update or a rollback the watch just ends.
    """

    def __init__(self, device: Device, state: SlotState, probation: Probation) -> None:
        self.device = device
        self.slot = state.active
        self.holds = state.slots                  # whose probation this is
        self.pending = array("d")                # ms per sample of each inference that ran
        self.failed = 0                           # model errors not saved yet
        self.rolled_back = self.over = False
        self._mutex = threading.Lock()            # a runtime may serve several threads
        self._schedule(probation.remaining)

    def _schedule(self, remaining: int) -> None:
        """When the next save is due: after ``limit`` outcomes or at time ``due``."""
        c = self.device.config
        self.limit = min(remaining, c.probation_save_inferences)
        self.due = time.perf_counter() + c.probation_save_seconds

    def report(self, ok: bool, started: float, ended: float, samples: int) -> bool:
        """Account one inference of ``samples`` run from ``started`` to ``ended``
        (``time.perf_counter()``; ``ok`` unless the model failed); True when probation is
        over for this runtime. Kept to an append and three comparisons: it runs on every
        inference (8 bytes each until the next save)."""
        if ok:
            self.pending.append((ended - started) * 1e3 / max(samples, 1))   # atomic
            if len(self.pending) < self.limit and ended < self.due:
                return False
        else:
            with self._mutex:
                self.failed += 1
        self.flush()
        return self.over

    def flush(self) -> None:
        """Save the outcomes not saved yet (also when the runtime goes away)."""
        with self._mutex:
            if (self.pending or self.failed) and not self.over:
                self.over = self._save()

    def _save(self) -> bool:
        dev = self.device
        with dev._locked():
            state = dev.state()
            if state.probation is None or (state.active, state.slots) != (self.slot, self.holds):
                return True               # decided elsewhere, or another model serves now
            batch = self.pending[:]
            del self.pending[:len(batch)]         # what other threads append meanwhile stays
            failed, self.failed = self.failed, 0  # under the mutex (flush)
            p, reason = _step(state.probation, dev.config, latencies_ms=batch, failed=failed)
            if reason:
                self.rolled_back = dev._fail(replace(state, probation=p), reason)
                return True
            dev._write_state(replace(state, probation=p))
            if p is None:
                dev._record("kept", state.current().version,  # type: ignore[union-attr]
                            "probation passed")
                return True
            self._schedule(p.remaining)
            return False
