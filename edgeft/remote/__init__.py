"""Bench a bundle on the device itself: over SSH (paramiko) or, without --remote, on this machine.

The bundle is copied over SFTP into `<dir>.partial` on the device (files the device already has with the same
sha256 are skipped), then renamed to its final name, so a half-copied bundle never sits under the final name
and a killed copy is picked up by the next run. The bundle's `bench_on_device.py` (byte for byte this edgeft's,
or refused) runs there with the device's Python and prints one JSON object (its layout:
edgeft/device/bench_on_device.py), parsed within bounds (edgeft/remote/result.py) and recorded in the local
bundle (edgeft.bundle.record_device_run); the rewritten manifest.json, report.md and SHA256SUMS
are copied back the same way, so the device holds the same bundle. Every command on the device is ended,
with what it started, when it runs past its timeout.

Host keys are checked against known_hosts as OpenSSH does: an unknown key is refused unless
`accept_new_host_key` (then it is appended, like StrictHostKeyChecking=accept-new), a changed key always.
Every failure is one EdgeftError line naming the host and what to do.
"""

from edgeft.remote.result import parse_result
from edgeft.remote.run import DeviceRun, bench_bundle, bench_local, bench_remote, script_args
from edgeft.remote.ssh import (
    DEVICE_SCRIPT,
    PARTIAL_SUFFIX,
    Completed,
    Endpoint,
    RemoteSpec,
    connect,
    fingerprint,
    parse_remote,
    resolve_endpoint,
    run_command,
    ssh_dir,
)
from edgeft.remote.sync import SyncReport, local_files, sync_bundle

__all__ = [
    "DEVICE_SCRIPT",
    "PARTIAL_SUFFIX",
    "Completed",
    "DeviceRun",
    "Endpoint",
    "RemoteSpec",
    "SyncReport",
    "bench_bundle",
    "bench_local",
    "bench_remote",
    "connect",
    "fingerprint",
    "local_files",
    "parse_remote",
    "parse_result",
    "resolve_endpoint",
    "run_command",
    "script_args",
    "ssh_dir",
    "sync_bundle",
]
