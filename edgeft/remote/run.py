"""Running bench_on_device.py on a bundle, on this machine or on a device, and recording its JSON result in the
bundle (edgeft.bundle.record_device_run), copied back so the device holds the same bundle.

edgeft runs only its own device code: on this machine the script installed with edgeft (a bundle's copy is
never run, whatever its digests say), on a device the bundle's copies only when they are byte for byte this
edgeft's (a bundle from another edgeft is refused, naming the file)."""

from __future__ import annotations

import shlex
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgeft.bundle import record_device_run
from edgeft.bundle.writer import DEVICE_SCRIPTS
from edgeft.constants import MANIFEST, MODEL_JSON, MODEL_KV, REPORT, REPORT_HTML, SHA256SUMS
from edgeft.errors import EdgeftError
from edgeft.files import sha256_file
from edgeft.remote.result import MAX_RESULT_BYTES, parse_result
from edgeft.remote.ssh import (
    DEFAULT_COMMAND_TIMEOUT,
    DEFAULT_CONNECT_TIMEOUT,
    DEFAULT_REMOTE_ROOT,
    DEVICE_SCRIPT,
    connect,
    parse_remote,
    resolve_endpoint,
    run_command,
)
from edgeft.remote.sync import SyncReport, helper_failure, sync_bundle
from edgeft.ui import task

if TYPE_CHECKING:
    pass


def script_args(
    *,
    threads: list[int] | None = None,
    runs: int | None = None,
    prompt_tokens: int | None = None,
    decode_tokens: int | None = None,
    only: list[str] | None = None,
    allow_native_libs: bool = False,
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
    if allow_native_libs:
        args.append("--allow-native-libs")
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

    bundle = Path(bundle).resolve()
    _bundle_script(bundle)
    script = OWN_DEVICE_DIR / DEVICE_SCRIPT  # this edgeft's, with its schema and checks beside it
    python = python or sys.executable
    where = "localhost"
    cmd = [python, "-I", str(script), str(bundle), *args]
    with tempfile.TemporaryDirectory(prefix="edgeft-device-") as cwd, task(f"bench on {where}"):
        try:
            code, out, err = run_capped(cmd, cwd=cwd, timeout=timeout, cap=MAX_RESULT_BYTES + 1)
        except (FileNotFoundError, PermissionError):
            raise EdgeftError(
                f"--python {python}: no such interpreter here; pass the path of a Python 3"
            ) from None
        except subprocess.TimeoutExpired:
            raise EdgeftError(f"{where}: {DEVICE_SCRIPT} ran past {timeout:.0f} s; raise --timeout") from None
    doc = _checked(_parse_or_fail(out, err, code, where), where)
    return DeviceRun(where, doc, record_device_run(bundle, doc, where))


def run_capped(cmd: list[str], *, cwd: str, timeout: float, cap: int) -> tuple[int, str, str]:
    """Run `cmd`, keeping at most `cap` bytes of its stdout and of its stderr (the rest is read and dropped, so
    the child never blocks): a child printing without end costs no memory here."""
    import threading

    proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    kept: dict[int, bytearray] = {1: bytearray(), 2: bytearray()}

    def pump(stream: Any, buf: bytearray) -> None:
        for block in iter(lambda: stream.read(1 << 16), b""):
            if len(buf) < cap:
                buf.extend(block[: cap - len(buf)])

    threads = [
        threading.Thread(target=pump, args=(proc.stdout, kept[1]), daemon=True),
        threading.Thread(target=pump, args=(proc.stderr, kept[2]), daemon=True),
    ]
    for t in threads:
        t.start()
    try:
        code = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise
    finally:
        for t in threads:
            t.join(timeout=5)
    return code, kept[1].decode("utf-8", "replace"), kept[2].decode("utf-8", "replace")


def _parse_or_fail(stdout: str, stderr: str, returncode: int, where: str) -> dict[str, Any]:
    try:
        return parse_result(stdout, where)
    except EdgeftError:
        if returncode == 0:
            raise
        last = (stderr.strip().splitlines() or ["no output"])[-1][:300]
        raise EdgeftError(f"{where}: {DEVICE_SCRIPT} failed (exit {returncode}): {last}") from None


OWN_DEVICE_DIR = Path(__file__).resolve().parent.parent / "device"


def _bundle_script(bundle: Path) -> Path:
    if not (bundle / MANIFEST).is_file():
        raise EdgeftError(f"{bundle}: not a bundle (no {MANIFEST}); pass the folder `edgeft build` wrote")
    script = bundle / DEVICE_SCRIPT
    if not script.is_file():
        raise EdgeftError(
            f"{bundle}: has no {DEVICE_SCRIPT} (written by an older edgeft); rebuild the bundle with this edgeft"
        )
    return script


def _own_device_code(bundle: Path) -> None:
    """The bundle's device scripts, which a device run executes, must be this edgeft's byte for byte."""
    for name in DEVICE_SCRIPTS:
        theirs = bundle / name
        if theirs.is_symlink() or not theirs.is_file():
            raise EdgeftError(f"{theirs}: missing or not a regular file; rebuild the bundle with this edgeft")
        if sha256_file(theirs) != sha256_file(OWN_DEVICE_DIR / name):
            raise EdgeftError(
                f"{theirs}: not this edgeft's {name} (edgeft runs only its own code on a device); rebuild the "
                "bundle with this edgeft"
            )


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

    bundle = Path(bundle).resolve()
    _bundle_script(bundle)
    _own_device_code(bundle)
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
            raise EdgeftError(helper_failure(ep.where, python, res))
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
                changed=[MANIFEST, MODEL_JSON, MODEL_KV, REPORT, REPORT_HTML, SHA256SUMS],
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
