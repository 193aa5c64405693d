"""Every TUF attack class against a real repository over HTTP: the update is rejected with
the right error and the device keeps serving its current verified model."""

from __future__ import annotations

import json
import shutil
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from securesystemslib.signer import CryptoSigner
from test_bundle_fixtures import W_BAD, assert_serving, make_repo, new_device, repo
from tuf.api.metadata import Metadata, Root, Targets, Timestamp

from edgeloop.bundle.repository import _SERIALIZER, _load_key
from edgeloop.errors import VerificationError

__all__ = ["repo"]


def _meta(r, name: str) -> Path:
    return r.dir / "metadata" / name


def _served_targets(r) -> Path:
    ts = json.loads(_meta(r, "timestamp.json").read_bytes())
    snap_v = ts["signed"]["meta"]["snapshot.json"]["version"]
    snap = json.loads(_meta(r, f"{snap_v}.snapshot.json").read_bytes())
    return _meta(r, f"{snap['signed']['meta']['targets.json']['version']}.targets.json")


def _model_file(r, version: str) -> Path:
    return next((r.dir / "targets" / "kws").glob(f"*.{version}.onnx"))


def _installed(r):
    dev = new_device(r)
    assert dev.update(r.url, "kws").installed
    return dev


def _rejected(dev, r, match: str) -> None:
    with pytest.raises(VerificationError, match=match) as e:
        dev.update(r.url, "kws")
    assert "still serving kws 1.0.0" in str(e.value)
    assert_serving(dev, "1.0.0")


def test_tampered_model_bytes(repo) -> None:
    dev = _installed(repo)
    repo.publish("1.1.0")
    f = _model_file(repo, "1.1.0")
    data = bytearray(f.read_bytes())
    data[-10] ^= 0xFF                       # same length, one byte flipped
    f.write_bytes(bytes(data))
    _rejected(dev, repo, "does not match its signed length or hash")


def test_signature_by_wrong_key(repo) -> None:
    dev = _installed(repo)
    evil = repo.publish("1.1.0", W_BAD, min_metric=0.0)
    path = _served_targets(repo)
    md = Metadata[Targets].from_bytes(path.read_bytes())
    for t in md.signed.targets.values():   # point every entry at the attacker's model
        t.length = evil.stat().st_size
    md.sign(CryptoSigner.generate_ed25519())
    path.write_bytes(md.to_bytes(_SERIALIZER))
    _rejected(dev, repo, "not signed by the trusted keys.*targets was signed by 0/1")


def test_rollback_to_older_metadata(repo) -> None:
    dev = new_device(repo)
    old_ts = _meta(repo, "timestamp.json").read_bytes()
    repo.publish("1.0.1")                  # a newer repository state the device will see...
    dev2 = dev
    assert dev2.update(repo.url, "kws").version == "1.0.1"
    _meta(repo, "timestamp.json").write_bytes(old_ts)  # ...then the attacker replays the old
    with pytest.raises(VerificationError, match="rolled back or mixed") as e:
        dev2.update(repo.url, "kws")
    assert "still serving kws 1.0.1" in str(e.value)
    assert dev2.active()[1].version == "1.0.1"


def test_freeze_with_expired_timestamp(repo) -> None:
    dev = _installed(repo)
    repo.publish("1.1.0")
    path = _meta(repo, "timestamp.json")
    md = Metadata[Timestamp].from_bytes(path.read_bytes())
    md.signed.version += 1                 # validly signed, but expired: a frozen mirror
    md.signed.expires = (datetime.now(UTC) - timedelta(hours=1)).replace(microsecond=0)
    root = Metadata[Root].from_bytes(_meta(repo, "root.json").read_bytes()).signed
    md.sign(_load_key(repo.keys, root.roles["timestamp"].keyids[0], None))
    path.write_bytes(md.to_bytes(_SERIALIZER))
    _rejected(dev, repo, "expired")


def test_mix_and_match_metadata(repo) -> None:
    dev = _installed(repo)
    older = _served_targets(repo).read_bytes()
    repo.publish("1.1.0")
    _served_targets(repo).write_bytes(older)  # the new snapshot with an old targets file
    _rejected(dev, repo, "rolled back or mixed")


def test_endless_data(repo) -> None:
    dev = _installed(repo)
    repo.publish("1.1.0")
    f = _model_file(repo, "1.1.0")
    f.write_bytes(f.read_bytes() + b"\0" * 1_000_000)
    _rejected(dev, repo, "longer than its signed length")


def test_one_compromised_key_of_threshold_two(tmp_path) -> None:
    r, server = make_repo(tmp_path, root_threshold=2)
    try:
        r.publish("1.0.0")
        dev = _installed(r)
        root_md = Metadata[Root].from_bytes(_meta(r, "root.json").read_bytes())
        stolen = _load_key(r.keys, root_md.signed.roles["root"].keyids[0], None)
        evil = CryptoSigner.generate_ed25519()
        new = root_md.signed
        new.version += 1
        for keyid in list(new.roles["targets"].keyids):
            new.revoke_key(keyid, "targets")
        new.add_key(evil.public_key, "targets")
        root_md.signatures.clear()
        root_md.sign(stolen)               # one of the two signatures the threshold needs
        root_md.sign(evil, append=True)
        _meta(r, "2.root.json").write_bytes(root_md.to_bytes(_SERIALIZER))
        _rejected(dev, r, "root was signed by 1/2")
    finally:
        server.shutdown()
        server.server_close()


def test_key_rotation_reaches_devices_without_reprovisioning(repo) -> None:
    from edgeloop.bundle import rotate_key

    dev = _installed(repo)
    old_targets = Metadata[Root].from_bytes(
        _meta(repo, "root.json").read_bytes()).signed.roles["targets"].keyids[0]
    rotate_key(repo.dir, "root", keys=repo.keys)
    rotate_key(repo.dir, "targets", keys=repo.keys)
    repo.publish("1.1.0")
    assert dev.update(repo.url, "kws").version == "1.1.0"
    assert (repo.keys / "revoked" / f"{old_targets}.pem").is_file()
    # the revoked targets key can no longer sign anything the device accepts
    repo.publish("1.2.0")
    path = _served_targets(repo)
    md = Metadata[Targets].from_bytes(path.read_bytes())
    md.sign(_load_key(repo.keys / "revoked", old_targets, None))
    path.write_bytes(md.to_bytes(_SERIALIZER))
    with pytest.raises(VerificationError, match="targets was signed by 0/1"):
        dev.update(repo.url, "kws")
    assert dev.active()[1].version == "1.1.0"
    shutil.rmtree(repo.keys / "revoked")
