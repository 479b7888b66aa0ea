"""A test bed of real hosts on one Linux machine: network namespaces with an sshd each.

    with testbed(workdir, n=2) as bed:
        trx.launch(fn, hostnames=bed.aliases, ssh_config_file=bed.ssh_config, ...)

Each host is a network namespace on a private bridge, with its own hostname (``host1``...,
through ``unshare --uts``), its own ``/etc/hosts`` (bind-mounted in a private mount
namespace) and an sshd on port 22; the filesystem is shared, so the launcher's interpreter
and working directory exist on every host. The launcher (this process) is the bridge's
address. Hosts have no default route: they reach nothing but the bridge's subnet.

Needs root (CAP_NET_ADMIN, CAP_SYS_ADMIN), ``ip``, ``unshare``, ``sshd`` and ``ssh-keygen``;
`Unavailable` says which is missing. Teardown kills every process left in the namespaces,
deletes them and the bridge, and raises if anything survives. A run that was SIGKILLed
leaves a registry entry behind, which the next `testbed` cleans up (`reap_stale`).
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import secrets
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["Host", "TestBed", "Unavailable", "prerequisites", "reap_stale", "testbed"]

SSHD = shutil.which("sshd") or "/usr/sbin/sshd"
REGISTRY = Path(os.environ.get("TRX_TESTBED_REGISTRY", f"/tmp/trx-testbed-{os.getuid()}"))


class Unavailable(Exception):
    """A prerequisite of the test bed is missing (the caller skips, or fails in CI)."""


@dataclass
class Host:
    alias: str  # Host entry in the ssh config, and the host's own hostname
    address: str
    netns: str
    sshd: subprocess.Popen[bytes] | None = None


@dataclass
class TestBed:
    __test__ = False  # not a test class, despite its name
    workdir: Path
    launcher_address: str  # this machine, as the hosts see it (the route's source address)
    second_launcher_address: str  # another address of this machine on the same bridge
    subnet: ipaddress.IPv4Network
    ssh_config: Path  # Host entries for every host, plus the extra aliases of `write_ssh_config`
    client_key: Path
    known_hosts: Path
    hosts: list[Host] = field(default_factory=list)

    @property
    def aliases(self) -> list[str]:
        return [h.alias for h in self.hosts]

    def unused_address(self) -> str:
        """An address in the hosts' subnet that nobody has: connecting to it times out."""
        return str(self.subnet.network_address + 200)

    def leftover_processes(self) -> dict[str, list[str]]:
        """Per host, the processes in its namespace other than its sshd listener: ``pid cmdline``."""
        left = {}
        for host in self.hosts:
            pids = [int(p) for p in _ip("netns", "pids", host.netns, check=False).stdout.split()]
            rows = [f"{p} {_cmdline(p)}" for p in pids if p != getattr(host.sshd, "pid", None) and _alive(p)]
            if rows:
                left[host.alias] = rows
        return left

    def wait_no_leftovers(self, timeout: float = 8.0) -> dict[str, list[str]]:
        """Poll until no process of ours is left on any host; return what is left at the end."""
        deadline = time.monotonic() + timeout
        while (left := self.leftover_processes()) and time.monotonic() < deadline:
            time.sleep(0.1)
        return left

    def exec_in(self, host: Host, *argv: str) -> subprocess.CompletedProcess[str]:
        """Run `argv` in `host`'s network namespace (not through ssh)."""
        return subprocess.run(["ip", "netns", "exec", host.netns, *argv], capture_output=True, text=True, timeout=30)


def prerequisites() -> None:
    """Raise `Unavailable` unless this machine can host a test bed."""
    if os.geteuid() != 0:
        raise Unavailable("the multi-host test bed needs root (network namespaces, bridge, sshd)")
    for tool in ("ip", "unshare", "ssh-keygen"):
        if shutil.which(tool) is None:
            raise Unavailable(f"{tool} is not installed (apt-get install iproute2 util-linux openssh-client)")
    if not os.access(SSHD, os.X_OK):
        raise Unavailable(f"{SSHD} is not installed (apt-get install openssh-server)")


# --------------------------------------------------------------------------- building
def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check, timeout=30)


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().rstrip(b"\0").replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _alive(pid: int) -> bool:
    """Running or sleeping; a zombie is already dead (PID 1 here reaps orphans lazily)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _start_time(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _keygen(path: Path) -> Path:
    for old in (path, path.with_name(f"{path.name}.pub")):  # from an earlier bed in the same folder
        old.unlink(missing_ok=True)
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "trx-testbed", "-f", str(path)], check=True)
    return path


def _free_subnet() -> ipaddress.IPv4Network:
    taken = []
    for line in _ip("-4", "-o", "addr").stdout.splitlines() + _ip("-4", "route").stdout.splitlines():
        for word in line.split():
            with contextlib.suppress(ValueError):
                if word[0].isdigit():
                    taken.append(ipaddress.ip_network(word, strict=False))
    for _ in range(100):
        candidate = ipaddress.ip_network(f"10.214.{secrets.randbelow(254) + 1}.0/24")
        if not any(candidate.overlaps(t) for t in taken if t.prefixlen):
            return candidate
    raise Unavailable("no free /24 under 10.214.0.0/16 for the test bed")


def _sshd_config(workdir: Path, host: Host) -> Path:
    path = workdir / f"sshd_config.{host.alias}"
    path.write_text(
        f"ListenAddress {host.address}\nPort 22\n"
        f"HostKey {workdir}/host_key\nPidFile none\n"
        f"AuthorizedKeysFile {workdir}/authorized_keys\n"
        "PermitRootLogin prohibit-password\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n"
        "UsePAM no\n"
        # the keys live under /tmp, whose mode 1777 StrictModes refuses
        "StrictModes no\n"
        "AllowTcpForwarding yes\nMaxStartups 100\nMaxSessions 100\nLogLevel VERBOSE\n"
    )
    return path


def _die_with_parent() -> None:  # runs in the child, before exec: sshd goes if this process dies
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _blank_file(workdir: Path) -> Path:
    path = workdir / "blank_bashrc"
    path.write_text("")
    return path


def _start_sshd(workdir: Path, host: Host, hosts_file: Path) -> None:
    argv = [
        "ip", "netns", "exec", host.netns,
        "unshare", "--uts", "--mount", "--propagation", "private",
        # Own hostname and /etc/hosts; and a blank ~/.bashrc, which Debian's bash reads for every
        # command run over ssh: the hosts must not depend on this machine's shell setup (a
        # pyenv rehash there can wait a minute on a lock left by a killed session).
        "sh", "-c",
        'hostname "$1" && mount --bind "$2" /etc/hosts && { [ ! -e "$3" ] || mount --bind "$4" "$3"; }'
        ' && shift 4 && exec "$@"',
        "sh", host.alias, str(hosts_file), os.path.expanduser("~/.bashrc"), str(_blank_file(workdir)),
        SSHD, "-D", "-e", "-f", str(_sshd_config(workdir, host)),
    ]  # fmt: skip
    log = workdir / f"sshd.{host.alias}.log"
    with open(log, "wb") as out:
        host.sshd = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True, preexec_fn=_die_with_parent,
        )  # fmt: skip
    deadline = time.monotonic() + 10
    while "Server listening on" not in log.read_text(errors="replace"):
        if host.sshd.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"sshd of {host.alias} did not start:\n{log.read_text(errors='replace')}")
        time.sleep(0.02)


def write_ssh_config(bed: TestBed, path: Path, extra: str = "") -> Path:
    """An ssh config with one Host entry per host (keys checked against the bed's known_hosts),
    followed by `extra`: more Host entries, under aliases of their own (for each option the first
    value found wins, so an entry for a host's alias here would not override the one above)."""
    entries = [
        f"Host {h.alias}\n    HostName {h.address}\n    User root\n    IdentityFile {bed.client_key}\n"
        f"    IdentitiesOnly yes\n    UserKnownHostsFile {bed.known_hosts}\n    ConnectTimeout 5\n"
        for h in bed.hosts
    ]
    path.write_text("\n".join(entries) + "\n" + extra)
    return path


@contextlib.contextmanager
def testbed(workdir: Path, n: int = 2) -> Iterator[TestBed]:
    """Build `n` hosts in `workdir`; tear everything down afterwards, whatever happened."""
    prerequisites()
    reap_stale()
    os.makedirs("/run/sshd", mode=0o755, exist_ok=True)  # sshd's privilege separation directory
    workdir.mkdir(parents=True, exist_ok=True)
    tag = secrets.token_hex(3)
    subnet = _free_subnet()
    bridge = f"trx{tag}b"
    hosts = [Host(f"host{i}", str(subnet.network_address + 10 + i), f"trx{tag}n{i}") for i in range(1, n + 1)]
    entry = _register(tag, bridge, [h.netns for h in hosts])
    try:
        try:
            _ip("link", "add", bridge, "type", "bridge")
        except subprocess.CalledProcessError as e:
            raise Unavailable(f"cannot create a bridge: {e.stderr.strip()}") from None
        launcher, second = str(subnet.network_address + 1), str(subnet.network_address + 2)
        _ip("addr", "add", f"{launcher}/24", "dev", bridge)  # the first is the routes' source address
        _ip("addr", "add", f"{second}/24", "dev", bridge)
        _ip("link", "set", bridge, "up")
        key = _keygen(workdir / "client_key")
        host_key = _keygen(workdir / "host_key")
        (workdir / "authorized_keys").write_text((workdir / "client_key.pub").read_text())
        known_hosts = workdir / "known_hosts"
        public_host_key = Path(f"{host_key}.pub").read_text().split()[:2]
        known_hosts.write_text("".join(f"{h.address} {' '.join(public_host_key)}\n" for h in hosts))
        hosts_file = workdir / "etc_hosts"
        hosts_file.write_text(
            f"127.0.0.1 localhost\n{launcher} launcher\n" + "".join(f"{h.address} {h.alias}\n" for h in hosts)
        )
        for i, host in enumerate(hosts, 1):
            _ip("netns", "add", host.netns)
            veth = f"trx{tag}h{i}"
            _ip("link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", host.netns)
            _ip("link", "set", veth, "master", bridge, "up")
            _ip("-n", host.netns, "link", "set", "lo", "up")  # lo starts DOWN in a new namespace
            _ip("-n", host.netns, "addr", "add", f"{host.address}/24", "dev", "eth0")
            _ip("-n", host.netns, "link", "set", "eth0", "up")
            _start_sshd(workdir, host, hosts_file)
        bed = TestBed(workdir, launcher, second, subnet, workdir / "ssh_config", key, known_hosts, hosts)
        write_ssh_config(bed, bed.ssh_config)
        yield bed
    finally:
        for host in hosts:
            if host.sshd is not None and host.sshd.poll() is None:
                host.sshd.terminate()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    host.sshd.wait(5)
        problems = _destroy(tag, bridge, [h.netns for h in hosts])
        if problems:
            raise RuntimeError("test bed teardown left things behind: " + "; ".join(problems))
        entry.unlink(missing_ok=True)


# --------------------------------------------------------------------------- tearing down
def _destroy(tag: str, bridge: str, namespaces: list[str]) -> list[str]:
    """Kill every process in the namespaces, delete them and the bridge; say what survived."""
    existing = set(_ip("netns", "list", check=False).stdout.split())
    for netns in namespaces:
        if netns not in existing:
            continue
        for _ in range(100):  # 'ip netns del' with processes inside would only drop the name
            pids = _ip("netns", "pids", netns, check=False).stdout.split()
            if not pids:
                break
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(pid), signal.SIGKILL)
            time.sleep(0.05)
        _ip("netns", "del", netns, check=False)
    for link in _our_links(tag):  # the host ends of the veths, then the bridge: synchronous
        if link != bridge:
            _ip("link", "del", link, check=False)
    _ip("link", "del", bridge, check=False)
    deadline = time.monotonic() + 5
    while True:
        left_ns = sorted(set(_ip("netns", "list", check=False).stdout.split()) & set(namespaces))
        left_links = _our_links(tag)
        if not (left_ns or left_links) or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    return [f"namespaces {left_ns}"] * bool(left_ns) + [f"links {left_links}"] * bool(left_links)


def _our_links(tag: str) -> list[str]:
    names = [line.split(":")[1].strip().split("@")[0] for line in _ip("-o", "link", check=False).stdout.splitlines()]
    return [name for name in names if name.startswith(f"trx{tag}")]


def _register(tag: str, bridge: str, namespaces: list[str]) -> Path:
    REGISTRY.mkdir(parents=True, exist_ok=True)
    entry = REGISTRY / f"{tag}.json"
    owner = os.getpid()
    entry.write_text(json.dumps({"tag": tag, "bridge": bridge, "netns": namespaces, "owner": owner,
                                 "owner_start": _start_time(owner)}))  # fmt: skip
    return entry


def reap_stale() -> list[str]:
    """Destroy test beds whose owning process is gone; never one whose owner still runs."""
    reaped = []
    for entry in sorted(REGISTRY.glob("*.json")) if REGISTRY.is_dir() else []:
        try:
            record = json.loads(entry.read_text())
        except (OSError, ValueError):
            continue
        if _start_time(record["owner"]) == record["owner_start"]:
            continue
        if not _destroy(record["tag"], record["bridge"], record["netns"]):
            entry.unlink(missing_ok=True)
            reaped.append(record["tag"])
    return reaped
