"""SSH to a device (paramiko): the `user@host[:port]` spec, ~/.ssh/config, host keys checked as OpenSSH does
(an unknown key refused unless accept_new_host_key, a changed key always), and commands run with a timeout
that ends what they started."""

from __future__ import annotations

import base64
import contextlib
import getpass
import hashlib
import os
import re
import shlex
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgeft.errors import EdgeftError

if TYPE_CHECKING:
    import paramiko


# The script every bundle carries at its root (copied by edgeft.bundle.write_bundle).
DEVICE_SCRIPT = "bench_on_device.py"
# The JSON layout version bench_on_device.py prints ("schema").
RESULT_SCHEMA = 1
# The most of a command's stdout (and of its stderr) kept: above edgeft.remote.result.MAX_RESULT_BYTES, so a
# result that large is named as too large rather than cut into something else.
MAX_OUTPUT_BYTES = (4 << 20) + 1
DEFAULT_PORT = 22
DEFAULT_CONNECT_TIMEOUT = 15.0
DEFAULT_COMMAND_TIMEOUT = 3600.0
# Where a bundle goes on the device when no --remote-dir is given ("~" is the login user's home).
DEFAULT_REMOTE_ROOT = "~/edgeft"
PARTIAL_SUFFIX = ".partial"
UPLOAD_SUFFIX = ".part"
# Seconds a small helper command on the device (hashing, renaming) may take; hashing runs at ≥100 MB/s on a
# Pi 5, so this covers bundles of many GB.
HELPER_TIMEOUT = 600.0
# SFTP: a copy with no progress for this long has lost the device; SSH keepalive interval during commands.
SFTP_STALL_TIMEOUT = 120.0
KEEPALIVE_SECONDS = 15

_SPEC = re.compile(r"(?:(?P<user>[^@\s:/]+)@)?(?P<host>\[[0-9A-Fa-f:.]+\]|[^@\s:/\[\]]+)(?::(?P<port>\d+))?")


@dataclass(frozen=True)
class RemoteSpec:
    """`user@host[:port]` as typed; user and port are None when not given (ssh config or defaults fill them)."""

    user: str | None
    host: str
    port: int | None


def parse_remote(spec: str) -> RemoteSpec:
    """Parse `user@host[:port]` (IPv6 in brackets: `user@[::1]:2222`); one line when it is not that."""
    m = _SPEC.fullmatch(spec.strip())
    port = int(m["port"]) if m and m["port"] else None
    if not m or (port is not None and not 1 <= port <= 65535):
        raise EdgeftError(
            f"--remote {spec!r}: expected user@host or user@host:port (port 1-65535), e.g. pi@raspberrypi.local"
        )
    return RemoteSpec(m["user"], m["host"].strip("[]"), port)


@dataclass(frozen=True)
class Endpoint:
    """Where to connect and as whom, after ~/.ssh/config: `alias` is the host as typed (used in messages)."""

    alias: str
    hostname: str
    port: int
    user: str
    identities: tuple[str, ...]
    known_hosts: Path
    proxy_command: str | None = None  # ProxyCommand, or ProxyJump as `ssh -W host:port jump`

    @property
    def where(self) -> str:
        """How results are labelled: user@host, with :port when it is not 22."""
        host = f"[{self.alias}]" if ":" in self.alias else self.alias
        return f"{self.user}@{host}" + ("" if self.port == DEFAULT_PORT else f":{self.port}")


def ssh_dir() -> Path:
    """~/.ssh of the user running edgeft (HOME decides, as for OpenSSH)."""
    return Path(os.path.expanduser("~")) / ".ssh"


def resolve_endpoint(spec: RemoteSpec, identity: Path | None = None) -> Endpoint:
    """Apply ~/.ssh/config (HostName, User, Port, IdentityFile, UserKnownHostsFile); the spec's own user and
    port win over the config's, --identity over IdentityFile."""
    import paramiko

    cfg_path = ssh_dir() / "config"
    found: dict[str, Any] = {}
    if cfg_path.is_file():
        try:
            found = dict(paramiko.SSHConfig.from_path(str(cfg_path)).lookup(spec.host))
        except (OSError, UnicodeDecodeError, paramiko.ConfigParseError) as e:
            raise EdgeftError(f"{cfg_path}: cannot read it ({e}); fix or move that file") from None
    try:
        port = spec.port or int(found.get("port", DEFAULT_PORT))
    except ValueError:
        raise EdgeftError(f"{cfg_path}: Port {found.get('port')!r} for {spec.host} is not a number") from None
    if identity is not None:
        key = Path(identity).expanduser()
        if not key.is_file():
            raise EdgeftError(
                f"--identity {identity}: no such key file; pass the private key (e.g. ~/.ssh/id_ed25519)"
            )
        identities: tuple[str, ...] = (str(key),)
    else:
        identities = tuple(
            p for p in (os.path.expanduser(f) for f in found.get("identityfile", [])) if Path(p).is_file()
        )
    known = found.get("userknownhostsfile")
    known_hosts = Path(os.path.expanduser(known.split()[0])) if known else ssh_dir() / "known_hosts"
    return Endpoint(
        alias=spec.host,
        hostname=found.get("hostname", spec.host),
        port=port,
        user=spec.user or found.get("user") or getpass.getuser(),
        identities=identities,
        known_hosts=known_hosts,
        proxy_command=_proxy_command(found, port),
    )


def _proxy_command(found: dict[str, Any], port: int) -> str | None:
    """~/.ssh/config's ProxyCommand (paramiko has expanded %h, %p), or ProxyJump handed to OpenSSH's own
    client as `ssh -W host:port` (ref: ssh_config(5) ProxyJump; ssh(1) -J, -W and ssh:// destinations)."""
    command = found.get("proxycommand")
    if command and command.strip().lower() != "none":
        return command
    jump = found.get("proxyjump")
    if not jump or jump.strip().lower() == "none":
        return None
    *rest, last = [j.strip() for j in jump.split(",") if j.strip()]
    host = found.get("hostname", "")
    target = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    args = ["ssh", *(["-J", ",".join(rest)] if rest else []), "-W", target, f"ssh://{last}"]
    return " ".join(shlex.quote(a) for a in args)


def fingerprint(key: paramiko.PKey) -> str:
    """A host key's fingerprint as OpenSSH prints it: SHA256:<base64 of sha256 of the key blob, unpadded>."""
    return "SHA256:" + base64.b64encode(hashlib.sha256(key.asbytes()).digest()).decode().rstrip("=")


def _known_hosts_name(ep: Endpoint) -> str:
    # ref: OpenSSH sshd(8) SSH_KNOWN_HOSTS FILE FORMAT: "[host]:port" for a port other than 22
    return ep.hostname if ep.port == DEFAULT_PORT else f"[{ep.hostname}]:{ep.port}"


def _host_key_policy(ep: Endpoint, accept_new: bool) -> paramiko.MissingHostKeyPolicy:
    """A key for a host not in known_hosts: refused in one line, or with accept_new appended to known_hosts."""
    import paramiko

    class Policy(paramiko.MissingHostKeyPolicy):
        def missing_host_key(self, client: paramiko.SSHClient, hostname: str, key: paramiko.PKey) -> None:
            if not accept_new:
                raise EdgeftError(
                    f"{ep.where}: host key {key.get_name()} {fingerprint(key)} is not in {ep.known_hosts}; "
                    "if this is your device, check the fingerprint (ssh-keygen -lf "
                    "/etc/ssh/ssh_host_ed25519_key.pub on it) and retry with --accept-new-host-key"
                )
            ep.known_hosts.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            line = f"{hostname} {key.get_name()} {key.get_base64()}\n"
            fd = os.open(ep.known_hosts, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            with os.fdopen(fd, "a", encoding="utf-8") as f:
                if f.tell() and not ep.known_hosts.read_bytes().endswith(b"\n"):
                    f.write("\n")
                f.write(line)
            client.get_host_keys().add(hostname, key.get_name(), key)

    return Policy()


def connect(
    ep: Endpoint, *, accept_new_host_key: bool = False, timeout: float = DEFAULT_CONNECT_TIMEOUT
) -> paramiko.SSHClient:
    """An authenticated SSH connection to `ep`; every failure is one EdgeftError line saying what to do."""
    import paramiko

    client = paramiko.SSHClient()
    if ep.known_hosts.is_file():
        try:
            client.load_host_keys(str(ep.known_hosts))
        except (OSError, paramiko.SSHException, paramiko.hostkeys.InvalidHostKey, UnicodeDecodeError) as e:
            # paramiko reads plain host lines only: @cert-authority / @revoked lines end up here
            raise EdgeftError(f"{ep.known_hosts}: cannot read it ({e}); fix or move that file") from None
    client.set_missing_host_key_policy(_host_key_policy(ep, accept_new_host_key))
    own_keys = bool(ep.identities)
    try:
        client.connect(
            ep.hostname,
            port=ep.port,
            username=ep.user,
            key_filename=list(ep.identities) or None,
            timeout=timeout,
            banner_timeout=timeout,
            auth_timeout=timeout,
            channel_timeout=timeout,
            sock=paramiko.ProxyCommand(ep.proxy_command) if ep.proxy_command else None,
            allow_agent=True,  # as OpenSSH: the agent's keys after the given ones (an encrypted key loaded there)
            look_for_keys=not own_keys,  # ~/.ssh/id_* only when no key was named
        )
    except EdgeftError:
        client.close()
        raise
    except Exception as e:  # noqa: BLE001 - paramiko and sockets fail in many ways; each becomes one line
        client.close()
        raise EdgeftError(_connect_failure(ep, e)) from None
    transport = client.get_transport()
    if transport is not None:  # keepalives notice a board that went away while a long command runs
        transport.set_keepalive(KEEPALIVE_SECONDS)
    return client


def _connect_failure(ep: Endpoint, e: Exception) -> str:
    import paramiko

    at = f"{ep.where}"
    if isinstance(e, paramiko.BadHostKeyException):
        return (
            f"{at}: the host key changed: the device sent {e.key.get_name()} {fingerprint(e.key)}, "
            f"{ep.known_hosts} has {fingerprint(e.expected_key)} — someone may be intercepting the connection, "
            "or the device was reinstalled; if you trust it, remove the old key with "
            f"`ssh-keygen -R '{_known_hosts_name(ep)}'` and retry with --accept-new-host-key"
        )
    if isinstance(e, paramiko.PasswordRequiredException):
        return f"{at}: the private key is encrypted; load it into ssh-agent (ssh-add KEY) and retry"
    if isinstance(e, paramiko.AuthenticationException):
        keys = ", ".join(ep.identities) or "your agent's and ~/.ssh/id_* keys"
        return (
            f"{at}: authentication failed for user {ep.user} with {keys}; pass --identity KEY or add your "
            f"public key to the device (ssh-copy-id -p {ep.port} {ep.user}@{ep.hostname})"
        )
    if isinstance(e, socket.gaierror):
        return f"{at}: unknown host name {ep.hostname!r} ({e.strerror}); check the name or use the IP address"
    if isinstance(e, TimeoutError | socket.timeout):
        return (
            f"{at}: no answer within the connect timeout; check the device is on and reachable "
            "(ping it), or raise --connect-timeout"
        )
    if isinstance(e, paramiko.ssh_exception.NoValidConnectionsError | ConnectionRefusedError):
        return (
            f"{at}: connection refused on port {ep.port}; is the SSH server running there "
            "(sudo systemctl enable --now ssh) and is the port right?"
        )
    if isinstance(e, paramiko.ProxyCommandFailure) or (
        ep.proxy_command and isinstance(e, paramiko.SSHException)
    ):
        return (
            f"{at}: the proxy command from ~/.ssh/config failed ({e}); run it by hand to see why: "
            f"{ep.proxy_command}"
        )
    # a banner that never came shows as paramiko's banner error, or (when the transport died before
    # authentication started) as "No existing session"
    if isinstance(e, paramiko.SSHException) and any(
        m in str(e).lower() for m in ("banner", "no existing session")
    ):
        return (
            f"{at}: the port answered but no SSH server spoke within the connect timeout; check the device "
            f"is not hung and port {ep.port} is its SSH server, or raise --connect-timeout"
        )
    if isinstance(e, paramiko.SSHException):
        return f"{at}: SSH handshake failed ({e}); check the device runs an SSH server on port {ep.port}"
    if isinstance(e, OSError):
        return f"{at}: cannot connect ({e.strerror or e}); check the address and the network"
    return f"{at}: cannot connect ({type(e).__name__}: {e})"


@dataclass(frozen=True)
class Completed:
    """What a command on the device returned."""

    returncode: int
    stdout: str
    stderr: str


# Printed first on stderr by every command edgeft runs on the device: the shell's pid, which is also its
# process group (sshd starts each session's command with setsid; ref: OpenSSH session.c do_exec_no_pty), so a
# command past its timeout or interrupted is ended with everything it started.
_PID_TAG = "edgeft-pid "


def run_command(
    client: paramiko.SSHClient,
    command: str,
    *,
    where: str,
    timeout: float,
    stdin: bytes = b"",
) -> Completed:
    """Run `command` on the device and collect its output; a run past `timeout` seconds (or interrupted)
    is ended on the device too, and the timeout is one line."""
    transport = client.get_transport()
    if transport is None or not transport.is_active():
        raise EdgeftError(f"{where}: the SSH connection dropped; check the network and retry")
    chan = transport.open_session(timeout=DEFAULT_CONNECT_TIMEOUT)
    out, err = bytearray(), bytearray()

    def keep(buf: bytearray, data: bytes) -> None:  # a device printing without end costs no memory here
        if len(buf) < MAX_OUTPUT_BYTES:
            buf.extend(data[: MAX_OUTPUT_BYTES - len(buf)])

    finished = False
    try:
        chan.settimeout(DEFAULT_CONNECT_TIMEOUT)  # for sending stdin; reads below only take what is there
        chan.exec_command(f'echo "{_PID_TAG}$$" >&2; {command}')
        if stdin:
            chan.sendall(stdin)
        chan.shutdown_write()
        deadline = time.monotonic() + timeout

        def drain() -> bool:
            got = False
            while chan.recv_ready():
                keep(out, chan.recv(1 << 16))
                got = True
            while chan.recv_stderr_ready():
                keep(err, chan.recv_stderr(1 << 16))
                got = True
            return got

        # SSH delivers a channel's data before its EOF: once EOF (or close) and the exit status are in, one
        # more drain has everything
        while not (chan.exit_status_ready() and (chan.eof_received or chan.closed)):
            if drain():
                continue
            if not transport.is_active():
                raise EdgeftError(f"{where}: the SSH connection dropped during the run; retry")
            if time.monotonic() > deadline:
                raise EdgeftError(
                    f"{where}: the command on the device ran past {timeout:.0f} s and was stopped; raise "
                    "--timeout or bench fewer artifacts (--only)"
                )
            time.sleep(0.02)
        drain()
        finished = True
        text = err.decode("utf-8", "replace")
        first, _, rest = text.partition("\n")
        return Completed(
            chan.recv_exit_status(),
            out.decode("utf-8", "replace"),
            rest if first.startswith(_PID_TAG) else text,
        )
    finally:
        chan.close()
        if not finished:
            _end_on_device(transport, err)


def _end_on_device(transport: paramiko.Transport, err: bytearray) -> None:
    """End a command left running on the device (its whole process group), best effort."""
    first = err.decode("utf-8", "replace").partition("\n")[0]
    pid = first.removeprefix(_PID_TAG).strip()
    if not first.startswith(_PID_TAG) or not pid.isdigit() or not transport.is_active():
        return
    with contextlib.suppress(Exception):  # the connection may be going down; nothing more to do then
        chan = transport.open_session(timeout=5)
        chan.exec_command(f"kill -TERM -- -{pid} 2>/dev/null || kill -TERM {pid}")
        chan.status_event.wait(5)
        chan.close()
