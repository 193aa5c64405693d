"""`edgeloop bench --remote` against a real OpenSSH server on 127.0.0.1.

The fixture starts Debian's sshd on a free port with a throw-away host key and user key;
the "device" runs this virtualenv's edgeloop (with this source tree on PYTHONPATH).
"""

from __future__ import annotations

import getpass
import json
import os
import shlex
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from test_cli import cli

import edgeloop
from edgeloop._ssh import RemoteConfig, remote_bench
from edgeloop.bench import BenchConfig
from edgeloop.errors import TransportError

SSHD = shutil.which("sshd") or "/usr/sbin/sshd"
FAST = BenchConfig(batches=(1, 2), duration=0.3, warmup=0.05, profile_runs=3)


@dataclass(frozen=True)
class Server:
    port: int
    user_key: Path
    known_hosts: Path
    command: str  # the remote edgeloop

    def remote(self, **changes: object) -> RemoteConfig:
        base = dict(command=self.command, port=self.port, identity=str(self.user_key),
                    options=("StrictHostKeyChecking=yes",
                             f"UserKnownHostsFile={self.known_hosts}"))
        return RemoteConfig(**{**base, **changes})

    def cli_args(self) -> list[str]:
        return ["--remote", f"{getpass.getuser()}@127.0.0.1", "--ssh-port", str(self.port),
                "--ssh-identity", str(self.user_key), "--remote-command", self.command,
                "--ssh-option", "StrictHostKeyChecking=yes",
                "--ssh-option", f"UserKnownHostsFile={self.known_hosts}"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _keygen(path: Path) -> None:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)], check=True)


@pytest.fixture(scope="module")
def sshd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    if not Path(SSHD).is_file():
        pytest.skip("openssh-server is not installed (.ci/run installs it)")
    root = tmp_path_factory.mktemp("sshd")
    _keygen(root / "host_key")
    _keygen(root / "user_key")
    (root / "authorized_keys").write_text((root / "user_key.pub").read_text())
    port = _free_port()
    (root / "sshd_config").write_text(f"""\
Port {port}
ListenAddress 127.0.0.1
HostKey {root}/host_key
PidFile {root}/sshd.pid
AuthorizedKeysFile {root}/authorized_keys
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin prohibit-password
StrictModes no
UsePAM no
Subsystem sftp internal-sftp
LogLevel ERROR
""")
    if os.geteuid() == 0:
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege-separation dir
    host_pub = (root / "host_key.pub").read_text().split()
    (root / "known_hosts").write_text(f"[127.0.0.1]:{port} {host_pub[0]} {host_pub[1]}\n")
    log = open(root / "sshd.log", "w")  # noqa: SIM115  (closed after the server stops)
    proc = subprocess.Popen([SSHD, "-D", "-e", "-f", str(root / "sshd_config")],
                            stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 10
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                log.close()
                pytest.fail(f"sshd did not start: {(root / 'sshd.log').read_text()}")
            time.sleep(0.05)
    src = Path(edgeloop.__file__).resolve().parents[1]
    edgeloop_bin = Path(sys.executable).parent / "edgeloop"
    command = (f"env PYTHONPATH={shlex.quote(str(src))} EDGELOOP_QUIET=1 "
               f"{shlex.quote(str(edgeloop_bin))}")
    try:
        yield Server(port=port, user_key=root / "user_key", known_hosts=root / "known_hosts",
                     command=command)
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        log.close()


def test_remote_bench_runs_on_the_device(sshd: Server, cnn_dir: Path) -> None:
    dest = f"{getpass.getuser()}@127.0.0.1"
    report = remote_bench(dest, cnn_dir / "model.onnx", config=FAST, remote=sshd.remote())
    assert [r.batch for r in report.results] == [1, 2]
    assert all(r.runs >= FAST.min_runs and r.seconds >= FAST.duration for r in report.results)
    # The device benchmarked its own copy, in a working folder it removed afterwards.
    copied = Path(report.model)
    assert copied.name == "model.onnx" and copied.parent != cnn_dir
    assert not copied.parent.exists()
    assert report.operators


def test_remote_cli_brings_back_json_and_draws_locally(
        sshd: Server, cnn_dir: Path, mnist_npz: dict[str, Path], tmp_path: Path) -> None:
    png = tmp_path / "remote.png"
    code, stdout, stderr = cli("bench", cnn_dir / "model.onnx", "--batch", "1",
                               "--duration", "0.2", "--warmup", "0", "--json", "--plot", png,
                               "--data", mnist_npz["test"], *sshd.cli_args())
    assert code == 0, stderr
    assert json.loads(stdout)["results"][0]["batch"] == 1
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_unreachable_host_is_one_line_exit_2(cnn_dir: Path, tmp_path: Path) -> None:
    closed = _free_port()  # nothing listens here
    png = tmp_path / "p.png"
    code, _stdout, stderr = cli("bench", cnn_dir / "model.onnx", "--remote", "nobody@127.0.0.1",
                               "--ssh-port", closed, "--plot", png)
    assert code == 2
    assert "cannot create a working folder on nobody@127.0.0.1" in stderr
    assert len(stderr.strip().splitlines()) == 1
    assert not png.exists()


def test_refused_key_is_a_transport_error(sshd: Server, cnn_dir: Path, tmp_path: Path) -> None:
    stranger = tmp_path / "stranger"
    _keygen(stranger)
    with pytest.raises(TransportError, match="Permission denied"):
        remote_bench(f"{getpass.getuser()}@127.0.0.1", cnn_dir / "model.onnx", config=FAST,
                     remote=sshd.remote(identity=str(stranger)))


def test_unknown_host_key_is_refused(sshd: Server, cnn_dir: Path, tmp_path: Path) -> None:
    empty = tmp_path / "known_hosts"
    empty.write_text("")
    with pytest.raises(TransportError, match="verification failed"):
        remote_bench(f"{getpass.getuser()}@127.0.0.1", cnn_dir / "model.onnx", config=FAST,
                     remote=sshd.remote(options=("StrictHostKeyChecking=yes",
                                                 f"UserKnownHostsFile={empty}")))


def test_missing_remote_edgeloop(sshd: Server, cnn_dir: Path) -> None:
    with pytest.raises(TransportError, match="was not found"):
        remote_bench(f"{getpass.getuser()}@127.0.0.1", cnn_dir / "model.onnx", config=FAST,
                     remote=sshd.remote(command="/nonexistent/edgeloop"))


def test_remote_error_is_reported_in_one_line(sshd: Server, tmp_path: Path) -> None:
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"not a model")
    code, _, stderr = cli("bench", junk, "--no-plot", *sshd.cli_args())
    assert code == 2
    assert "edgeloop bench failed" in stderr and "not a valid ONNX model" in stderr
    assert len(stderr.strip().splitlines()) == 1
