"""Build side: a TUF repository of model bundles, made with ``tuf.api.metadata``.

Layout of a repository folder (static files; any HTTP server, CDN or object store can
serve it)::

    DIR/metadata/N.root.json      every root version (the rotation chain devices walk)
    DIR/metadata/root.json        a copy of the newest root, for provisioning devices
    DIR/metadata/N.targets.json   consistent snapshots: versioned targets and snapshot
    DIR/metadata/N.snapshot.json
    DIR/metadata/timestamp.json   written last, so readers see a consistent repository
    DIR/targets/NAME/HASH.manifest.json, DIR/targets/NAME/HASH.X.Y.Z.onnx

Keys are ed25519, one PEM (PKCS#8) file per key named after its key id, in a folder
outside DIR; a passphrase, when given, encrypts them. Signing a role uses every key file
present for that role's key ids in the newest root.
"""

from __future__ import annotations

import copy
import os
import shutil
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from securesystemslib.signer import CryptoSigner, SSlibKey
from tuf.api.metadata import (
    Metadata,
    MetaFile,
    Root,
    Snapshot,
    TargetFile,
    Targets,
    Timestamp,
)
from tuf.api.serialization.json import JSONSerializer

from edgeloop._io import write_bytes_atomic
from edgeloop.bundle.manifest import Manifest, parse_version
from edgeloop.errors import TransportError, UsageError, VerificationError, one_of

__all__ = [
    "ROLES",
    "RepoConfig",
    "init_repo",
    "manifest_target",
    "publish_bundle",
    "refresh_repo",
    "rotate_key",
    "serve_repo",
]

ROLES = ("root", "targets", "snapshot", "timestamp")
_SERIALIZER = JSONSerializer(compact=False)


@dataclass(frozen=True)
class RepoConfig:
    """Expiry of each role's metadata and when ``refresh`` re-signs it."""

    root_days: float = 365.0
    targets_days: float = 90.0
    snapshot_days: float = 7.0
    timestamp_days: float = 1.0
    refresh_margin_days: float = 0.5   # re-sign a role that expires within this margin

    def expiry(self, role: str, now: datetime | None = None) -> datetime:
        """When a freshly signed ``role`` expires."""
        days = {"root": self.root_days, "targets": self.targets_days,
                "snapshot": self.snapshot_days, "timestamp": self.timestamp_days}[role]
        return ((now or datetime.now(UTC)) + timedelta(days=days)).replace(microsecond=0)


def manifest_target(name: str) -> str:
    """The TUF target path of the newest manifest published under ``name``."""
    return f"{name}/manifest.json"


def _meta(repo: Path) -> Path:
    return Path(repo) / "metadata"


def _check_repo(repo: Path) -> None:
    if not (_meta(repo) / "root.json").is_file() or not (_meta(repo) / "timestamp.json").is_file():
        raise UsageError(f"{str(repo)!r} is not an edgeloop repository (no metadata/root.json "
                         "and metadata/timestamp.json); create one with `edgeloop repo init`")


# --- keys -------------------------------------------------------------------------------

def _new_key(keys_dir: Path, passphrase: bytes | None) -> CryptoSigner:
    priv = Ed25519PrivateKey.generate()
    signer = CryptoSigner(priv, SSlibKey.from_crypto(priv.public_key()))
    enc = (serialization.BestAvailableEncryption(passphrase) if passphrase
           else serialization.NoEncryption())
    pem = priv.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, enc)
    keys_dir.mkdir(parents=True, exist_ok=True)
    path = keys_dir / f"{signer.public_key.keyid}.pem"
    write_bytes_atomic(path, pem, mode=0o600)
    return signer


def _load_key(keys_dir: Path, keyid: str, passphrase: bytes | None) -> CryptoSigner | None:
    path = keys_dir / f"{keyid}.pem"
    if not path.is_file():
        return None
    try:
        priv = serialization.load_pem_private_key(path.read_bytes(), passphrase)
    except TypeError:
        raise UsageError(f"key file {str(path)!r} is encrypted; give its passphrase "
                         "(EDGELOOP_KEY_PASSPHRASE)") from None
    except ValueError:
        raise UsageError(f"key file {str(path)!r} cannot be read (wrong passphrase or not "
                         "a PEM private key)") from None
    return CryptoSigner(priv, SSlibKey.from_crypto(priv.public_key()))


def _sign(md: Metadata, root: Root, role: str, keys_dir: Path, passphrase: bytes | None,
          *, need_threshold: bool = True) -> None:
    md.signatures.clear()
    signed = 0
    for keyid in root.roles[role].keyids:
        signer = _load_key(keys_dir, keyid, passphrase)
        if signer is not None:
            md.sign(signer, append=True)
            signed += 1
    if need_threshold and signed < root.roles[role].threshold:
        raise UsageError(f"only {signed} of the {root.roles[role].threshold} keys needed to "
                         f"sign {role} are in {str(keys_dir)!r}")


# --- repository state -------------------------------------------------------------------

@dataclass
class _Repo:
    dir: Path
    keys: Path
    passphrase: bytes | None
    config: RepoConfig
    root: Metadata[Root]
    targets: Metadata[Targets]
    snapshot: Metadata[Snapshot]
    timestamp: Metadata[Timestamp]

    @classmethod
    def open(cls, repo: Path, keys: Path, passphrase: bytes | None,
             config: RepoConfig) -> _Repo:
        _check_repo(repo)
        m = _meta(repo)
        try:
            root = Metadata[Root].from_file(str(m / "root.json"))
            ts = Metadata[Timestamp].from_file(str(m / "timestamp.json"))
            snap = Metadata[Snapshot].from_file(
                str(m / f"{ts.signed.snapshot_meta.version}.snapshot.json"))
            targets = Metadata[Targets].from_file(
                str(m / f"{snap.signed.meta['targets.json'].version}.targets.json"))
        except (OSError, ValueError, KeyError) as e:
            raise VerificationError(f"repository {str(repo)!r} metadata is unreadable ({e})"
                                    ) from None
        return cls(Path(repo), Path(keys), passphrase, config, root, targets, snap, ts)

    def write_root(self) -> None:
        data = self.root.to_bytes(_SERIALIZER)
        write_bytes_atomic(_meta(self.dir) / f"{self.root.signed.version}.root.json", data)
        write_bytes_atomic(_meta(self.dir) / "root.json", data)

    def write(self, *, targets: bool, snapshot: bool, first: bool = False) -> None:
        """Re-sign and write targets/snapshot (if asked) and always timestamp, in the
        order that keeps the served repository consistent. ``first``: keep version 1."""
        root, m, now = self.root.signed, _meta(self.dir), datetime.now(UTC)
        bump = 0 if first else 1
        if targets:
            self.targets.signed.version += bump
            self.targets.signed.expires = self.config.expiry("targets", now)
            _sign(self.targets, root, "targets", self.keys, self.passphrase)
            write_bytes_atomic(m / f"{self.targets.signed.version}.targets.json",
                               self.targets.to_bytes(_SERIALIZER))
            self.snapshot.signed.meta["targets.json"] = MetaFile(self.targets.signed.version)
            snapshot = True
        if snapshot:
            self.snapshot.signed.version += bump
            self.snapshot.signed.expires = self.config.expiry("snapshot", now)
            _sign(self.snapshot, root, "snapshot", self.keys, self.passphrase)
            write_bytes_atomic(m / f"{self.snapshot.signed.version}.snapshot.json",
                               self.snapshot.to_bytes(_SERIALIZER))
            self.timestamp.signed.snapshot_meta = MetaFile(self.snapshot.signed.version)
        self.timestamp.signed.version += bump
        self.timestamp.signed.expires = self.config.expiry("timestamp", now)
        _sign(self.timestamp, root, "timestamp", self.keys, self.passphrase)
        write_bytes_atomic(m / "timestamp.json", self.timestamp.to_bytes(_SERIALIZER))


def _passphrase(passphrase: str | None) -> bytes | None:
    return passphrase.encode() if passphrase else None


def init_repo(repo: str | os.PathLike[str], *, keys: str | os.PathLike[str],
              root_threshold: int = 1, root_keys: int | None = None,
              passphrase: str | None = None, config: RepoConfig | None = None) -> Path:
    """Create an empty repository in ``repo`` with new ed25519 keys in ``keys``.

    ``root_keys`` root keys are made (default: ``root_threshold``), any ``root_threshold``
    of which sign a new root. Returns the path of ``metadata/1.root.json``, the trusted
    root devices are provisioned with.
    """
    repo, keys, config = Path(repo), Path(keys), config or RepoConfig()
    n_root = root_keys if root_keys is not None else root_threshold
    if root_threshold < 1 or n_root < root_threshold:
        raise UsageError(f"`root_threshold` must be between 1 and the number of root keys "
                         f"({n_root}); got {root_threshold}")
    if _meta(repo).exists() and any(_meta(repo).iterdir()):
        raise UsageError(f"{str(repo)!r} already holds a repository; refusing to overwrite it")
    if keys.resolve().is_relative_to(repo.resolve()):
        raise UsageError(f"keys folder {str(keys)!r} must be outside the repository folder, "
                         "which is published")
    pw, now = _passphrase(passphrase), datetime.now(UTC)
    root = Root(expires=config.expiry("root", now), consistent_snapshot=True)
    for role in ROLES:
        for _ in range(n_root if role == "root" else 1):
            root.add_key(_new_key(keys, pw).public_key, role)
    root.roles["root"].threshold = root_threshold
    r = _Repo(repo, keys, pw, config, Metadata(root),
              Metadata(Targets(version=1, expires=config.expiry("targets", now))),
              Metadata(Snapshot(version=1, expires=config.expiry("snapshot", now))),
              Metadata(Timestamp(version=1, expires=config.expiry("timestamp", now))))
    _sign(r.root, root, "root", keys, pw)
    (repo / "targets").mkdir(parents=True, exist_ok=True)
    r.write_root()
    r.write(targets=True, snapshot=True, first=True)
    return _meta(repo) / "1.root.json"


def _current_manifest(r: _Repo, name: str) -> Manifest | None:
    info = r.targets.signed.targets.get(manifest_target(name))
    if info is None:
        return None
    digest = info.hashes["sha256"]
    return Manifest.from_bytes((r.dir / "targets" / name / f"{digest}.manifest.json")
                               .read_bytes())


def publish_bundle(repo: str | os.PathLike[str], model: str | os.PathLike[str], *,
                   keys: str | os.PathLike[str], manifest: Manifest,
                   passphrase: str | None = None, config: RepoConfig | None = None,
                   files: Mapping[str, str | os.PathLike[str]] | None = None) -> Manifest:
    """Add ``model`` with ``manifest`` (see :func:`edgeloop.bundle.build_manifest`) as the
    newest bundle of ``manifest.name``, with the manifest's ``files`` from ``files``
    (name -> path); re-sign targets, snapshot and timestamp."""
    r = _Repo.open(Path(repo), Path(keys), _passphrase(passphrase), config or RepoConfig())
    current = _current_manifest(r, manifest.name)
    if current is not None and parse_version(manifest.version) <= parse_version(current.version):
        raise UsageError(f"version {manifest.version} is not greater than the published "
                         f"{current.version}")
    given = dict(files or {})
    if set(given) != {f.name for f in manifest.files}:
        raise UsageError(f"the manifest lists files {sorted(f.name for f in manifest.files)}; "
                         f"got {sorted(given)}")
    tdir = r.dir / "targets" / manifest.name
    tdir.mkdir(parents=True, exist_ok=True)
    model_info = TargetFile.from_file(manifest.model_target, str(model))
    if model_info.hashes["sha256"] != manifest.sha256:
        raise UsageError(f"manifest sha256 does not match {str(model)!r}")
    dest = tdir / f"{manifest.sha256}.{manifest.model_target.rsplit('/', 1)[1]}"
    shutil.copyfile(model, dest.with_suffix(".part"))
    os.replace(dest.with_suffix(".part"), dest)
    for f in manifest.files:
        info = TargetFile.from_file(f.target, str(given[f.name]))
        if info.hashes["sha256"] != f.sha256:
            raise UsageError(f"manifest sha256 of {f.name} does not match "
                             f"{str(given[f.name])!r}")
        fdest = tdir / f"{f.sha256}.{f.target.rsplit('/', 1)[1]}"
        shutil.copyfile(given[f.name], fdest.with_name(fdest.name + ".part"))
        os.replace(fdest.with_name(fdest.name + ".part"), fdest)
        r.targets.signed.targets[info.path] = info
    data = manifest.to_bytes()
    man_info = TargetFile.from_data(manifest_target(manifest.name), data)
    write_bytes_atomic(tdir / f"{man_info.hashes['sha256']}.manifest.json", data)
    r.targets.signed.targets[model_info.path] = model_info
    r.targets.signed.targets[man_info.path] = man_info
    r.write(targets=True, snapshot=True)
    return manifest


def refresh_repo(repo: str | os.PathLike[str], *, keys: str | os.PathLike[str],
                 passphrase: str | None = None, config: RepoConfig | None = None) -> list[str]:
    """Re-sign timestamp, and targets/snapshot when they expire within the refresh margin
    (a cron job runs this well inside the timestamp's lifetime). Returns the roles signed."""
    config = config or RepoConfig()
    r = _Repo.open(Path(repo), Path(keys), _passphrase(passphrase), config)
    soon = datetime.now(UTC) + timedelta(days=config.refresh_margin_days)
    t = r.targets.signed.expires <= soon
    s = t or r.snapshot.signed.expires <= soon
    r.write(targets=t, snapshot=s)
    return [role for role, done in (("targets", t), ("snapshot", s), ("timestamp", True)) if done]


def rotate_key(repo: str | os.PathLike[str], role: str, *, keys: str | os.PathLike[str],
               revoke: str | None = None, passphrase: str | None = None,
               config: RepoConfig | None = None) -> list[str]:
    """Replace ``role``'s keys (or only the key id ``revoke``) with new ones.

    A new root version lists the new keys and no longer the old ones; it is signed by the
    old root's threshold and, for the root role, also by the new root keys, so devices
    follow the chain without re-provisioning. Old key files move to ``keys/revoked/``.
    Returns the new key ids.
    """
    if role not in ROLES:
        raise one_of("role", ROLES, role)
    config = config or RepoConfig()
    keys = Path(keys)
    r = _Repo.open(Path(repo), keys, _passphrase(passphrase), config)
    root = r.root.signed
    old_ids = list(root.roles[role].keyids)
    if revoke is not None and revoke not in old_ids:
        raise UsageError(f"key id {revoke!r} is not a {role} key; {role} keys are "
                         f"{', '.join(old_ids)}")
    gone = [revoke] if revoke else old_ids
    old_root = copy.deepcopy(root)
    new_ids = []
    for keyid in gone:
        signer = _new_key(keys, r.passphrase)
        root.add_key(signer.public_key, role)
        root.revoke_key(keyid, role)
        new_ids.append(signer.public_key.keyid)
    root.version += 1
    root.expires = config.expiry("root")
    # the old root's threshold vouches for the new root, and the new root for itself
    r.root.signatures.clear()
    for keyid in dict.fromkeys([*old_root.roles["root"].keyids, *root.roles["root"].keyids]):
        signer = _load_key(keys, keyid, r.passphrase)
        if signer is not None:
            r.root.sign(signer, append=True)
    for label, trusted in (("old", old_root), ("new", root)):
        have = sum(k in r.root.signatures for k in trusted.roles["root"].keyids)
        if have < trusted.roles["root"].threshold:
            raise UsageError(f"only {have} of the {trusted.roles['root'].threshold} {label} "
                             f"root keys needed to sign the new root are in {str(keys)!r}")
    r.write_root()
    r.write(targets=role == "targets", snapshot=role == "snapshot")
    revoked = keys / "revoked"
    revoked.mkdir(exist_ok=True)
    for keyid in gone:
        if (keys / f"{keyid}.pem").exists() and not any(
                keyid in rl.keyids for rl in root.roles.values()):
            os.replace(keys / f"{keyid}.pem", revoked / f"{keyid}.pem")
    return new_ids


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        """Requests are not logged."""


def serve_repo(repo: str | os.PathLike[str], *, port: int = 8000,
               host: str = "127.0.0.1") -> tuple[ThreadingHTTPServer, threading.Thread]:
    """Serve ``repo`` as static files in a background thread (``port=0``: a free port).
    Call ``server.shutdown()`` to stop it."""
    _check_repo(Path(repo))
    try:
        server = ThreadingHTTPServer((host, port),
                                     partial(_QuietHandler, directory=str(repo)))
    except OSError as e:
        raise TransportError(f"cannot listen on {host}:{port} ({e.strerror})") from None
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    return server, thread
