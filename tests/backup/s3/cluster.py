"""A throw-away one-node Ceph cluster with radosgw on loopback, for the S3 backend's tests and
benchmark (docs/backup-repository.md §1.2).

One monitor (msgr v1), one OSD on the memstore backend (data in RAM, no disk), no manager, no
cephx, pools of size 1, and radosgw's beast frontend on 127.0.0.1. Every file (configuration,
monitor store, logs, sockets) lives under one scratch directory; nothing survives `stop()`.
Start-up takes about 1.5 s. Ports are picked free at start, so several clusters (one per test
worker) can run side by side.

    with RadosGW(tmp_dir) as rgw:
        rgw.create_user("alice", ACCESS_KEY, SECRET_KEY)
        ... S3 requests to rgw.endpoint ...
        rgw.kill_rgw(); rgw.start_rgw()        # radosgw alone, for fault tests
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

BINARIES = ("ceph-mon", "ceph-osd", "radosgw", "radosgw-admin", "monmaptool", "ceph")


def missing_binaries() -> list[str]:
    return [b for b in BINARIES if shutil.which(b) is None]


def _die_with_parent() -> None:
    """In the child: get SIGKILL when the thread that started it ends (no strays when the
    test process dies)."""
    import ctypes
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ClusterError(RuntimeError):
    """The cluster did not start (the message carries the tail of the relevant log)."""


class RadosGW:
    """A one-node Ceph cluster serving S3 on `endpoint` (http://127.0.0.1:PORT)."""

    def __init__(self, root: Path, *, memstore_bytes: int = 4 << 30) -> None:
        self.root = Path(root)
        self.memstore_bytes = memstore_bytes
        self.mon_port = 0
        self.rgw_port = 0
        self.rgw_tls_port = 0
        self.ca_path = self.root / "tls" / "ca.pem"
        self.conf = self.root / "ceph.conf"
        self._procs: dict[str, subprocess.Popen[bytes]] = {}
        self._spawner = ThreadPoolExecutor(1, thread_name_prefix="ceph-spawner")
        self.startup_s = 0.0

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.rgw_port}"

    @property
    def tls_endpoint(self) -> str:
        """The same radosgw over HTTPS, with a certificate for 127.0.0.1 signed by a private
        CA (`ca_path`)."""
        return f"https://127.0.0.1:{self.rgw_tls_port}"

    # -- configuration ---------------------------------------------------------------------

    def _write_conf(self) -> None:
        d = self.root
        frontend = " ".join([
            "beast", f"endpoint=127.0.0.1:{self.rgw_port}",
            f"ssl_endpoint=127.0.0.1:{self.rgw_tls_port}",
            f"ssl_certificate={d}/tls/server.pem", f"ssl_private_key={d}/tls/server.key",
            "tcp_nodelay=1"])   # without it, small answers wait for delayed ACKs (40 ms)
        self.conf.write_text(f"""[global]
fsid = {uuid.uuid4()}
mon host = [v1:127.0.0.1:{self.mon_port}]
mon initial members = a
public addr = 127.0.0.1
ms bind msgr2 = false
auth cluster required = none
auth service required = none
auth client required = none
run dir = {d}/run
admin socket = {d}/run/$name.asok
pid file = {d}/run/$name.pid
log file = {d}/log/$name.log
crash dir = {d}/crash
mon cluster log file = {d}/log/$cluster.$channel.log
osd pool default size = 1
osd pool default min size = 1
osd pool default pg num = 8
osd pool default pgp num = 8
osd pool default pg autoscale mode = off
osd crush chooseleaf type = 0
mon allow pool size one = true
mon allow pool delete = true
mon warn on pool no redundancy = false
mon warn on insecure global id reclaim allowed = false
mon data avail warn = 1
[mon]
paxos propose interval = 0.05
mon data = {d}/mon.$id
[osd]
osd data = {d}/osd.$id
osd objectstore = memstore
memstore device bytes = {self.memstore_bytes}
osd crush update on start = false
osd class update on start = false
# radosgw watches control objects; one killed leaves its watches behind, and every metadata
# change (a new bucket) waits for them to time out: 30 s by default.
osd client watch timeout = 3
[client.rgw.a]
rgw data = {d}/rgw.a
rgw frontends = {frontend}
""")

    def _write_tls(self) -> None:
        """A private CA and a server certificate for 127.0.0.1 (EC P-256, one day)."""
        import datetime
        import ipaddress

        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID

        tls = self.root / "tls"
        tls.mkdir(exist_ok=True)
        now = datetime.datetime.now(datetime.timezone.utc)
        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test CA")])
        ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
              .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
              .not_valid_before(now - datetime.timedelta(hours=1))
              .not_valid_after(now + datetime.timedelta(days=1))
              .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
              .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True,
                                           crl_sign=True, content_commitment=False,
                                           key_encipherment=False, data_encipherment=False,
                                           key_agreement=False, encipher_only=False,
                                           decipher_only=False), critical=True)
              .sign(ca_key, hashes.SHA256()))
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (x509.CertificateBuilder()
                .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
                .issuer_name(ca_name).public_key(key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(hours=1))
                .not_valid_after(now + datetime.timedelta(days=1))
                .add_extension(x509.SubjectAlternativeName(
                    [x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                     x509.DNSName("localhost")]), critical=False)
                .sign(ca_key, hashes.SHA256()))
        self.ca_path.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
        (tls / "server.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM) +
                                         ca.public_bytes(serialization.Encoding.PEM))
        (tls / "server.key").write_bytes(key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption()))

    # -- processes -------------------------------------------------------------------------

    def _run(self, *args: str, timeout: float = 30) -> str:
        r = subprocess.run(list(args), capture_output=True, timeout=timeout,
                           stdin=subprocess.DEVNULL)
        if r.returncode != 0:
            raise ClusterError(f"{' '.join(args)} failed ({r.returncode}): "
                               f"{(r.stderr or r.stdout).decode(errors='replace')[-2000:]}")
        return r.stdout.decode()

    def _spawn(self, name: str, *args: str) -> None:
        out = open(self.root / "log" / f"{name}.out", "ab")
        try:
            # The parent-death signal follows the thread that forks, so every process is
            # started from one thread that lives as long as the cluster.
            self._procs[name] = self._spawner.submit(
                subprocess.Popen, list(args), stdin=subprocess.DEVNULL, stdout=out,
                stderr=subprocess.STDOUT, preexec_fn=_die_with_parent).result()
        finally:
            out.close()

    def _log_tail(self, name: str) -> str:
        tails = []
        for path in (self.root / "log" / f"{name}.out", self.root / "log" / f"{name}.log"):
            if path.exists():
                tails.append(f"{path.name}: " + path.read_text(errors="replace")[-1500:])
        return "\n".join(tails)

    def start(self) -> None:
        start = time.monotonic()
        for sub in ("run", "log", "crash", "mon.a", "osd.0", "rgw.a"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self.mon_port, self.rgw_port, self.rgw_tls_port = free_port(), free_port(), free_port()
        self._write_tls()
        self._write_conf()
        c = str(self.conf)
        try:
            self._run("monmaptool", "--create", "--clobber", "--fsid",
                      self._fsid(), "--addv", "a", f"[v1:127.0.0.1:{self.mon_port}]",
                      str(self.root / "monmap"))
            self._run("ceph-mon", "-c", c, "-i", "a", "--mkfs", "--monmap",
                      str(self.root / "monmap"))
            self._spawn("mon.a", "ceph-mon", "-c", c, "-i", "a", "-f")
            osd_uuid = str(uuid.uuid4())
            osd_id = self._run("ceph", "-c", c, "--connect-timeout", "20", "osd", "new",
                               osd_uuid).strip()
            if osd_id != "0":
                raise ClusterError(f"ceph osd new gave id {osd_id!r}, expected 0")
            self._run("ceph", "-c", c, "osd", "crush", "add", "osd.0", "1", "root=default")
            self._run("ceph-osd", "-c", c, "-i", "0", "--mkfs", "--osd-uuid", osd_uuid)
            self._spawn("osd.0", "ceph-osd", "-c", c, "-i", "0", "-f")
            # radosgw waits for the OSD by itself: its port opens once its pools are usable.
            self.start_rgw()
        except BaseException:
            self.stop()
            raise
        self.startup_s = time.monotonic() - start

    def _fsid(self) -> str:
        for line in self.conf.read_text().splitlines():
            if line.startswith("fsid = "):
                return line.split(" = ", 1)[1]
        raise AssertionError("no fsid in the configuration")

    def start_rgw(self, timeout_s: float = 30) -> None:
        """Start radosgw (again) and wait until it answers HTTP."""
        proc = self._procs.get("rgw.a")
        if proc is not None and proc.poll() is None:
            raise ClusterError("radosgw is already running")
        self._spawn("rgw.a", "radosgw", "-c", str(self.conf), "-n", "client.rgw.a", "-f")
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for name, p in self._procs.items():
                if p.poll() is not None:
                    raise ClusterError(f"{name} exited with {p.returncode} during start-up:\n"
                                       f"{self._log_tail(name)}")
            if self._answers_http():
                return
            time.sleep(0.02)
        raise ClusterError(f"radosgw did not answer on {self.endpoint} within {timeout_s} s:\n"
                           f"{self._log_tail('rgw.a')}\n{self._log_tail('osd.0')}")

    def _answers_http(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.rgw_port), timeout=1) as s:
                s.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
                return s.recv(12).startswith(b"HTTP/1.1")
        except OSError:
            return False

    def rgw_running(self) -> bool:
        proc = self._procs.get("rgw.a")
        return proc is not None and proc.poll() is None

    def kill_rgw(self, sig: int = signal.SIGKILL) -> None:
        """Stop radosgw alone, abruptly by default (the monitor and the OSD keep running)."""
        proc = self._procs.pop("rgw.a", None)
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(sig)
        proc.wait(timeout=30)

    def restart_rgw(self) -> None:
        self.kill_rgw()
        self.start_rgw()

    def stop(self) -> None:
        """Stop radosgw, the OSD, then the monitor (each waited for, killed after 5 s)."""
        for name in ("rgw.a", "osd.0", "mon.a"):
            proc = self._procs.pop(name, None)
            if proc is None or proc.poll() is not None:
                continue
            proc.terminate()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)

    def __enter__(self) -> "RadosGW":
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- administration --------------------------------------------------------------------

    def admin(self, *args: str) -> str:
        """Run radosgw-admin against this cluster; its standard output."""
        return self._run("radosgw-admin", "-c", str(self.conf), *args)

    def create_user(self, uid: str, access_key: str, secret_key: str) -> None:
        self.admin("user", "create", "--uid", uid, "--display-name", uid,
                   "--access-key", access_key, "--secret", secret_key)
