"""Copying a bundle to a device: over SFTP into `<dir>.partial` (files the device already has with the same
sha256 are skipped), then renamed to its final name by the device-side helper (edgeft/device/sync_on_device.py),
so a half-copied bundle never sits under the final name and a killed copy is picked up by the next run."""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import stat
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

from edgeft.bundle import bundle_files
from edgeft.constants import BUNDLE_USER_DIRS, MANIFEST, SHA256SUMS
from edgeft.errors import EdgeftError
from edgeft.files import sha256_file
from edgeft.remote.ssh import (
    HELPER_TIMEOUT,
    PARTIAL_SUFFIX,
    SFTP_STALL_TIMEOUT,
    UPLOAD_SUFFIX,
    Completed,
    run_command,
)

if TYPE_CHECKING:
    import paramiko


# --- copying a bundle ------------------------------------------------------------------------------------

# The device's side of a copy (standard library only), sent as the code of `python -I -c`.
_DEVICE_SYNC = (Path(__file__).resolve().parent.parent / "device" / "sync_on_device.py").read_text(
    encoding="utf-8"
)


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

    rels = [*bundle_files(bundle), MANIFEST, SHA256SUMS]
    # regular files only, never through a link (a manifest.json linked to ~/.ssh/id_rsa is not uploaded)
    return {rel: bundle / rel for rel in sorted(rels) if _regular(bundle / rel)}


def _regular(path: Path) -> bool:
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except OSError:
        return False


def _python_cmd(python: str, code: str, *args: str) -> str:
    return " ".join(shlex.quote(x) for x in (python, "-I", "-c", code, *args))


def _helper(
    client: paramiko.SSHClient, where: str, python: str, code: str, *args: str, stdin: bytes = b""
) -> str:
    res = run_command(
        client, _python_cmd(python, code, *args), where=where, timeout=HELPER_TIMEOUT, stdin=stdin
    )
    if res.returncode != 0:
        raise EdgeftError(helper_failure(where, python, res))
    return res.stdout


def helper_failure(where: str, python: str, res: Completed) -> str:
    last = (res.stderr.strip().splitlines() or ["no output"])[-1][:300]
    if res.returncode == 127 or ("not found" in last and python in last):
        return (
            f"{where}: {python} was not found on the device; install Python 3 there "
            "(sudo apt install python3) or pass --python /path/to/python3"
        )
    if "not a bundle copy edgeft made" in last or "the device copy's own marker" in last:
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
