"""Running the bundle's own bench_on_device.py, on this machine or on a device, and recording its JSON result
in the bundle (edgeft.bundle.record_device_run), copied back so the device holds the same bundle."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgeft.bundle import record_device_run
from edgeft.constants import MANIFEST, MODEL_JSON, MODEL_KV, REPORT, REPORT_HTML, SHA256SUMS
from edgeft.errors import EdgeftError
from edgeft.remote.ssh import (
    DEFAULT_COMMAND_TIMEOUT,
    DEFAULT_CONNECT_TIMEOUT,
    DEFAULT_REMOTE_ROOT,
    DEVICE_SCRIPT,
    RESULT_SCHEMA,
    connect,
    parse_remote,
    resolve_endpoint,
    run_command,
)
from edgeft.remote.sync import SyncReport, helper_failure, sync_bundle
from edgeft.ui import task

if TYPE_CHECKING:
    pass


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
