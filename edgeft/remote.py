"""Bench a bundle on the device itself: over SSH (paramiko) or, without --remote, on this machine.

The bundle is copied over SFTP into `<dir>.partial` on the device (files the device already has with the same
sha256 are skipped), then renamed to its final name, so a half-copied bundle never sits under the final name
and a killed copy is picked up by the next run. The bundle's own `bench_on_device.py` runs there with the
device's Python and prints one JSON object (its layout: edgeft/device/bench_on_device.py), which is recorded
in the local bundle (edgeft.bundle.record_device_run); the rewritten manifest.json, report.md and SHA256SUMS
are copied back the same way, so the device holds the same bundle. Every command on the device is ended,
with what it started, when it runs past its timeout.

Host keys are checked against known_hosts as OpenSSH does: an unknown key is refused unless
`accept_new_host_key` (then it is appended, like StrictHostKeyChecking=accept-new), a changed key always.
Every failure is one EdgeftError line naming the host and what to do.
"""

from __future__ import annotations

import base64
import contextlib
import getpass
import hashlib
import json
import os
import re
import shlex
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

from edgeft.constants import BUNDLE_USER_DIRS, MANIFEST, MODEL_JSON, REPORT, REPORT_HTML, SHA256SUMS
from edgeft.errors import EdgeftError

if TYPE_CHECKING:
    import paramiko

# The script every bundle carries at its root (copied by edgeft.bundle.write_bundle).
DEVICE_SCRIPT = "bench_on_device.py"
# The JSON layout version bench_on_device.py prints ("schema").
RESULT_SCHEMA = 1
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
                out.extend(chan.recv(1 << 16))
                got = True
            while chan.recv_stderr_ready():
                err.extend(chan.recv_stderr(1 << 16))
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


# --- copying a bundle ------------------------------------------------------------------------------------

# The device's side of a copy (standard library only), sent as the code of `python -I -c`.
_DEVICE_SYNC = (Path(__file__).parent / "device" / "sync_on_device.py").read_text(encoding="utf-8")


@dataclass
class SyncReport:
    """What a copy to the device did."""

    remote_dir: str = ""
    copied_files: int = 0
    copied_bytes: int = 0
    skipped_files: int = 0
    skipped_bytes: int = 0
    copied: list[str] = field(default_factory=list)


def local_files(bundle: Path) -> dict[str, Path]:
    """Every regular file of a bundle (manifest.json and SHA256SUMS included) by POSIX relative path."""
    from edgeft.bundle import bundle_files

    rels = [*bundle_files(bundle), MANIFEST, SHA256SUMS]
    return {rel: bundle / rel for rel in sorted(rels) if (bundle / rel).is_file()}


def _python_cmd(python: str, code: str, *args: str) -> str:
    return " ".join(shlex.quote(x) for x in (python, "-I", "-c", code, *args))


def _helper(
    client: paramiko.SSHClient, where: str, python: str, code: str, *args: str, stdin: bytes = b""
) -> str:
    res = run_command(
        client, _python_cmd(python, code, *args), where=where, timeout=HELPER_TIMEOUT, stdin=stdin
    )
    if res.returncode != 0:
        raise EdgeftError(_helper_failure(where, python, res))
    return res.stdout


def _helper_failure(where: str, python: str, res: Completed) -> str:
    last = (res.stderr.strip().splitlines() or ["no output"])[-1][:300]
    if res.returncode == 127 or ("not found" in last and python in last):
        return (
            f"{where}: {python} was not found on the device; install Python 3 there "
            "(sudo apt install python3) or pass --python /path/to/python3"
        )
    if "no .edgeft marker" in last:
        return f"{where}: {last}"
    if last.startswith("SyntaxError"):  # e.g. `from __future__ import annotations` on Python 3.6
        return f"{where}: {python} on the device is too old; edgeft's device code needs Python 3.8 or newer"
    return f"{where}: a file operation on the device failed (exit {res.returncode}: {last})"


def sync_bundle(
    client: paramiko.SSHClient,
    bundle: Path,
    remote_dir: str,
    *,
    where: str,
    python: str = "python3",
    progress: Any = None,
    changed: list[str] | None = None,
) -> SyncReport:
    """Copy `bundle` to `remote_dir` on the device over SFTP, skipping files it has with the same sha256.

    Files go to `<remote_dir>.partial/<rel>.part`, are renamed to `<rel>` when complete, and the folder is
    renamed to `remote_dir` only when every file is there; `progress(done_bytes, total_bytes)` is called as
    bytes go out. `changed`: only these files may differ from the device's copy (it was just synced), so the
    rest are compared by size instead of re-hashed there.
    """
    files = local_files(bundle)
    partial = remote_dir + PARTIAL_SUFFIX
    job = {"want": list(files), "hash": changed, "keep": list(BUNDLE_USER_DIRS)}
    out = _helper(
        client, where, python, _DEVICE_SYNC, "prepare", remote_dir, partial, stdin=json.dumps(job).encode()
    )
    try:
        state = json.loads(out.strip().splitlines()[-1])
        rdir, have = str(state["dir"]), dict(state["files"])
    except (ValueError, KeyError, IndexError, TypeError):
        raise EdgeftError(f"{where}: unexpected answer from the device's Python ({out[:200]!r})") from None
    from edgeft.files import sha256_file

    todo = []
    report = SyncReport()
    for rel, path in files.items():
        size = path.stat().st_size
        same = f"size:{size}" if changed is not None and rel not in changed else sha256_file(path)
        if have.get(rel) == same:
            report.skipped_files += 1
            report.skipped_bytes += size
        else:
            todo.append((rel, path, size))
    total = sum(size for _, _, size in todo)
    if todo:
        try:
            sftp = client.open_sftp()
        except Exception as e:  # noqa: BLE001 - the server may have no SFTP subsystem
            raise EdgeftError(
                f"{where}: cannot open SFTP ({e}); enable the sftp subsystem in the device's sshd_config"
            ) from None
        # a board that drops off mid-copy ends the copy after this long without progress, not at TCP's leisure
        sftp.get_channel().settimeout(SFTP_STALL_TIMEOUT)
        try:
            done = 0
            for rel, path, size in todo:
                dst = str(PurePosixPath(rdir) / rel)
                tmp = dst + UPLOAD_SUFFIX

                def step(sent: int, _size: int, base: int = done) -> None:
                    if progress is not None:
                        progress(base + sent, total)

                try:
                    sftp.put(str(path), tmp, callback=step)
                    try:
                        sftp.posix_rename(tmp, dst)
                    except OSError:  # a server without the posix-rename extension: remove, then rename
                        with contextlib.suppress(OSError):
                            sftp.remove(dst)
                        sftp.rename(tmp, dst)
                except OSError as e:
                    raise EdgeftError(
                        f"{where}: copying {rel} to {dst} failed ({e.strerror or e}); check free space on "
                        "the device (df -h) and retry: what was copied is kept"
                    ) from None
                except Exception as e:  # noqa: BLE001 - paramiko's SSHException, a stalled channel's timeout
                    raise EdgeftError(
                        f"{where}: the connection failed while copying {rel} ({type(e).__name__}: {e}); "
                        "check the device is reachable and retry: what was copied is kept"
                    ) from None
                done += size
                report.copied_files += 1
                report.copied_bytes += size
                report.copied.append(rel)
                if progress is not None:
                    progress(done, total)
        finally:
            sftp.close()
    report.remote_dir = _helper(client, where, python, _DEVICE_SYNC, "finish", remote_dir, partial).strip()
    return report


# --- the on-device script's result -------------------------------------------------------------------------


def parse_result(stdout: str, where: str) -> dict[str, Any]:
    """bench_on_device.py's JSON object, checked for the fields edgeft reads; one line when it is not that."""
    text = stdout.strip()
    doc: Any = None
    for candidate in (text, *(reversed(text.splitlines()))):
        try:
            doc = json.loads(candidate)
            break
        except ValueError:
            continue
    if not isinstance(doc, dict):
        raise EdgeftError(f"{where}: {DEVICE_SCRIPT} printed no JSON object ({text[-200:]!r})")
    if doc.get("schema") != RESULT_SCHEMA:
        raise EdgeftError(
            f"{where}: {DEVICE_SCRIPT} wrote schema {doc.get('schema')!r}, this edgeft reads {RESULT_SCHEMA}; "
            "rebuild the bundle with this edgeft"
        )
    if not isinstance(doc.get("artifacts"), list) or not isinstance(doc.get("integrity"), dict):
        raise EdgeftError(f"{where}: {DEVICE_SCRIPT}'s JSON lacks artifacts or integrity")
    if not all(isinstance(a, dict) and isinstance(a.get("path"), str) for a in doc["artifacts"]):
        raise EdgeftError(f"{where}: {DEVICE_SCRIPT}'s JSON has an artifact without a path")
    return doc


def script_args(
    *,
    threads: list[int] | None = None,
    runs: int | None = None,
    prompt_tokens: int | None = None,
    decode_tokens: int | None = None,
    only: list[str] | None = None,
) -> list[str]:
    """The on-device script's options (its CLI: edgeft/device/bench_on_device.py); None keeps its default."""
    args: list[str] = []
    if threads:
        args += ["--threads", ",".join(str(t) for t in threads)]
    for flag, value in (
        ("--runs", runs),
        ("--prompt-tokens", prompt_tokens),
        ("--decode-tokens", decode_tokens),
    ):
        if value is not None:
            args += [flag, str(value)]
    for rel in only or []:
        args += ["--artifact", rel]
    return args


def _checked(doc: dict[str, Any], where: str) -> dict[str, Any]:
    """The result, unless the device found the bundle damaged (then it benchmarked nothing)."""
    integ = doc["integrity"]
    if not integ.get("ok"):
        problems = integ.get("problems") or ["no detail"]
        raise EdgeftError(
            f"{where}: the bundle failed its integrity check on the device ({len(problems)} problem(s), "
            f"first: {str(problems[0])[:200]}); run `edgeft check` on it and rebuild it if that fails too"
        )
    return doc


@dataclass(frozen=True)
class DeviceRun:
    """A recorded bench_on_device.py run: where, its result, the comparison with that device's previous run,
    what the copy to the device did (remote runs) and a note when something after recording went wrong."""

    where: str
    result: dict[str, Any]
    comparison: dict[str, Any]
    sync: SyncReport | None = None
    note: str | None = None

    @property
    def failed(self) -> list[str]:
        """Artifacts the device script could not benchmark (status "failed"; "skipped" is not a failure)."""
        return [str(a.get("path")) for a in self.result["artifacts"] if a.get("status") == "failed"]

    def to_json(self) -> dict[str, Any]:
        return {
            "where": self.where,
            "sync": asdict(self.sync) if self.sync else None,
            "comparison": self.comparison,
            "result": self.result,
            "note": self.note,
        }


def bench_local(
    bundle: Path, args: list[str], *, python: str | None = None, timeout: float = DEFAULT_COMMAND_TIMEOUT
) -> DeviceRun:
    """Run the bundle's bench_on_device.py on this machine in a child process (as on a device: isolated
    from the working folder) and record the result (where = "localhost")."""
    from edgeft.bundle import record_device_run
    from edgeft.ui import task

    bundle = Path(bundle).resolve()
    script = _bundle_script(bundle)
    python = python or sys.executable
    where = "localhost"
    cmd = [python, "-I", str(script), str(bundle), *args]
    with tempfile.TemporaryDirectory(prefix="edgeft-device-") as cwd, task(f"bench on {where}"):
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, timeout=timeout)
        except (FileNotFoundError, PermissionError):
            raise EdgeftError(
                f"--python {python}: no such interpreter here; pass the path of a Python 3"
            ) from None
        except subprocess.TimeoutExpired:
            raise EdgeftError(f"{where}: {DEVICE_SCRIPT} ran past {timeout:.0f} s; raise --timeout") from None
    doc = _checked(_parse_or_fail(proc.stdout, proc.stderr, proc.returncode, where), where)
    return DeviceRun(where, doc, record_device_run(bundle, doc, where))


def _parse_or_fail(stdout: str, stderr: str, returncode: int, where: str) -> dict[str, Any]:
    try:
        return parse_result(stdout, where)
    except EdgeftError:
        if returncode == 0:
            raise
        last = (stderr.strip().splitlines() or ["no output"])[-1][:300]
        raise EdgeftError(f"{where}: {DEVICE_SCRIPT} failed (exit {returncode}): {last}") from None


def _bundle_script(bundle: Path) -> Path:
    if not (bundle / MANIFEST).is_file():
        raise EdgeftError(f"{bundle}: not a bundle (no {MANIFEST}); pass the folder `edgeft build` wrote")
    script = bundle / DEVICE_SCRIPT
    if not script.is_file():
        raise EdgeftError(
            f"{bundle}: has no {DEVICE_SCRIPT} (written by an older edgeft); rebuild the bundle with this edgeft"
        )
    return script


def default_remote_dir(bundle: Path) -> str:
    """`~/edgeft/<bundle name>` on the device."""
    return f"{DEFAULT_REMOTE_ROOT}/{Path(bundle).resolve().name}"


def bench_remote(
    bundle: Path,
    remote: str,
    args: list[str],
    *,
    identity: Path | None = None,
    accept_new_host_key: bool = False,
    python: str = "python3",
    remote_dir: str | None = None,
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
    timeout: float = DEFAULT_COMMAND_TIMEOUT,
) -> DeviceRun:
    """Copy the bundle to the device, run its bench_on_device.py there, record the result in the bundle,
    and copy the recorded manifest.json, report.md and SHA256SUMS back so the device holds the same bundle."""
    from edgeft.bundle import record_device_run
    from edgeft.ui import task

    bundle = Path(bundle).resolve()
    _bundle_script(bundle)
    ep = resolve_endpoint(parse_remote(remote), identity)
    rdir = (remote_dir or default_remote_dir(bundle)).rstrip("/")
    if rdir in ("", "~", "."):
        raise EdgeftError(
            f"--remote-dir {remote_dir!r}: give a folder for the bundle, e.g. ~/edgeft/{bundle.name}"
        )
    client = connect(ep, accept_new_host_key=accept_new_host_key, timeout=connect_timeout)
    try:
        with task(f"copy to {ep.where}") as update:
            sync = sync_bundle(client, bundle, rdir, where=ep.where, python=python, progress=update)
        there = sync.remote_dir
        cmd = " ".join(shlex.quote(x) for x in (python, "-I", f"{there}/{DEVICE_SCRIPT}", there, *args))
        with task(f"bench on {ep.where}"):
            res = run_command(client, f"cd {shlex.quote(there)} && {cmd}", where=ep.where, timeout=timeout)
        if res.returncode == 127:
            raise EdgeftError(_helper_failure(ep.where, python, res))
        doc = _checked(_parse_or_fail(res.stdout, res.stderr, res.returncode, ep.where), ep.where)
        comparison = record_device_run(bundle, doc, ep.where)
        note = None
        try:  # what recording rewrote; the rest was verified on the device by this run
            sync_bundle(
                client,
                bundle,
                rdir,
                where=ep.where,
                python=python,
                changed=[MANIFEST, MODEL_JSON, REPORT, REPORT_HTML, SHA256SUMS],
            )
        except EdgeftError as e:
            note = f"the results are recorded here, but the device's copy was not updated: {e}"
    finally:
        client.close()
    return DeviceRun(ep.where, doc, comparison, sync, note)


def bench_bundle(
    bundle: Path,
    args: list[str],
    *,
    remote: str | None = None,
    identity: Path | None = None,
    accept_new_host_key: bool = False,
    python: str | None = None,
    remote_dir: str | None = None,
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
    timeout: float = DEFAULT_COMMAND_TIMEOUT,
) -> DeviceRun:
    """`edgeft bench BUNDLE [--remote user@host]`: run the bundle's own benchmark script on the device (or on
    this machine) and record its result in the bundle (edgeft.bundle.record_device_run)."""
    if remote is None:
        if identity is not None or accept_new_host_key or remote_dir is not None:
            raise EdgeftError("--identity, --accept-new-host-key and --remote-dir need --remote user@host")
        return bench_local(bundle, args, python=python, timeout=timeout)
    return bench_remote(
        bundle,
        remote,
        args,
        identity=identity,
        accept_new_host_key=accept_new_host_key,
        python=python or "python3",
        remote_dir=remote_dir,
        connect_timeout=connect_timeout,
        timeout=timeout,
    )
