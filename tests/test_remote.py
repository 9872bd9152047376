"""`edgeft bench BUNDLE --remote user@host:port` against a real OpenSSH server on 127.0.0.1: the bundle is
copied over SFTP (a second run copies nothing), its bench_on_device.py runs in a runtime-only virtual
environment, the result lands in manifest.json (`device_latency`) and report.md, and the bundle still passes
`edgeft check`. Host keys, unreachable hosts and regressions each have their own test; the user's real
~/.ssh is never read or written (HOME points into the test's folder)."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import getpass
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import bundles
import pytest
from bundles import Bundles

from edgeft import bundle, remote
from edgeft.check import check_bundle
from edgeft.constants import MANIFEST, MODEL_JSON, REPORT, SHA256SUMS
from edgeft.device.sync_on_device import COPY_MARKER
from edgeft.errors import EdgeftError
from edgeft.remote.ssh import RESULT_SCHEMA
from edgeft.targets import ArtifactSpec

SSHD = Path("/usr/sbin/sshd")
TARGET = dataclasses.replace(bundles.TARGET, artifacts=(ArtifactSpec("gguf", "q8_0"),))
# Small and quick: two thread counts, one timed run of an 8-token prompt and 4 decoded tokens.
QUICK = ("--thread-sweep", "1,2", "--runs", "1", "--prompt-tokens", "8", "--decode-tokens", "4")


@pytest.fixture(autouse=True)
def _no_agent(monkeypatch: pytest.MonkeyPatch) -> None:
    """No ssh-agent for in-process connections either: only the keys a test names log in."""
    monkeypatch.delenv("SSH_AUTH_SOCK", raising=False)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _keygen(path: Path) -> None:
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "edgeft-test", "-f", str(path)],
        check=True,
        capture_output=True,
        timeout=60,
    )


@dataclass(frozen=True)
class Sshd:
    """A throwaway OpenSSH server on 127.0.0.1 that lets `user` in with `key`."""

    port: int
    user: str
    key: Path
    host_pub: Path
    root: Path

    @property
    def spec(self) -> str:
        return f"{self.user}@127.0.0.1:{self.port}"

    def home(self, name: str) -> Path:
        """A fresh HOME for the client (its own ~/.ssh/known_hosts), so the real one is never touched."""
        home = self.root / "homes" / name
        (home / ".ssh").mkdir(parents=True)
        return home


@pytest.fixture(scope="module")
def sshd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sshd]:
    assert SSHD.is_file(), (
        f"{SSHD} is missing: install Debian's openssh-server (apt-get install -y openssh-server; .ci/run does)"
    )
    root = tmp_path_factory.mktemp("sshd")
    _keygen(root / "host_ed25519")
    _keygen(root / "client_ed25519")
    shutil.copy(root / "client_ed25519.pub", root / "authorized_keys")
    port = _free_port()
    cfg = root / "sshd_config"
    cfg.write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nHostKey {root / 'host_ed25519'}\nPidFile {root / 'sshd.pid'}\n"
        f"AuthorizedKeysFile {root / 'authorized_keys'}\nPermitRootLogin prohibit-password\n"
        "PasswordAuthentication no\nKbdInteractiveAuthentication no\nPubkeyAuthentication yes\n"
        "StrictModes no\nUsePAM no\nSubsystem sftp internal-sftp\nLogLevel ERROR\n"
    )
    with contextlib.suppress(PermissionError):  # sshd insists on its privilege-separation folder
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
    log = open(root / "sshd.log", "wb")  # noqa: SIM115 - closed at teardown
    proc = subprocess.Popen([str(SSHD), "-D", "-e", "-f", str(cfg)], stdout=log, stderr=log)
    deadline = time.monotonic() + 20
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                break
        except OSError:
            assert proc.poll() is None, (root / "sshd.log").read_text()
            assert time.monotonic() < deadline, "sshd did not start listening within 20 s"
            time.sleep(0.1)
    try:
        yield Sshd(port, getpass.getuser(), root / "client_ed25519", root / "host_ed25519.pub", root)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


@pytest.fixture(scope="module")
def made(tiny_llama: Path, tiny_exports: list, tmp_path_factory: pytest.TempPathFactory) -> Bundles:
    """A small bundle (one GGUF q8_0 of the tiny Llama, no fine-tune) as `edgeft build` writes it."""
    work = tmp_path_factory.mktemp("remote")
    arts = [a for a in tiny_exports if a.spec in TARGET.artifacts]
    assert [a.spec for a in arts] == list(TARGET.artifacts)
    fresh = bundles.write(tiny_llama, arts, work / "dist", target=TARGET)
    assert (fresh / remote.DEVICE_SCRIPT).is_file(), (
        "write_bundle should put bench_on_device.py in the bundle"
    )
    return Bundles(fresh, work)


def _edgeft(*args: str, home: Path) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, HOME=str(home), COLUMNS="200")
    env.pop("SSH_AUTH_SOCK", None)  # no agent: only the keys a test names log in
    return subprocess.run(
        [sys.executable, "-m", "edgeft", *args], capture_output=True, text=True, timeout=600, env=env
    )


def _one_error_line(res: subprocess.CompletedProcess[str], *needles: str) -> str:
    assert res.returncode == 2, (res.returncode, res.stdout, res.stderr)
    err = res.stderr.strip()
    assert "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, err
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


def _files(folder: Path) -> dict[str, str]:
    """Every file under `folder` but a device copy's own marker (its record of what edgeft copied there)."""
    return {
        p.relative_to(folder).as_posix(): bundle.sha256_file(p)
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != COPY_MARKER
    }


# --- over SSH -------------------------------------------------------------------------------------------------


def test_remote_bench_records_and_a_second_run_copies_nothing(
    sshd: Sshd, made: Bundles, runtime_venv: Path
) -> None:
    b = made("remote")
    home = sshd.home("first")
    device_dir = sshd.root / "device" / "tiny-device"
    args = (
        "bench",
        str(b),
        "--remote",
        sshd.spec,
        "--identity",
        str(sshd.key),
        "--python",
        str(runtime_venv),
    )
    args += ("--remote-dir", str(device_dir), *QUICK, "--json")
    n_files = len(remote.local_files(b))
    n_bytes = sum(p.stat().st_size for p in remote.local_files(b).values())
    first = _edgeft(*args, "--accept-new-host-key", home=home)
    assert first.returncode == 0, first.stderr[-3000:]
    out = json.loads(first.stdout)
    assert out["where"] == f"{sshd.user}@127.0.0.1:{sshd.port}"
    assert out["sync"]["copied_files"] == n_files and out["sync"]["skipped_files"] == 0
    assert out["sync"]["copied_bytes"] == n_bytes  # the bundle as it was before the result was recorded
    # the new host key went into the test's known_hosts, as OpenSSH writes a non-22 port
    host_key = sshd.host_pub.read_text().split()[1]
    assert f"[127.0.0.1]:{sshd.port} ssh-ed25519 {host_key}" in (home / ".ssh" / "known_hosts").read_text()

    m = json.loads((b / MANIFEST).read_text())
    [run] = m["device_latency"]
    assert run["where"] == out["where"] and run["recorded"].endswith("Z")
    [art] = run["result"]["artifacts"]
    assert art["path"] == "model-q8_0.gguf" and art["status"] == "ok", art
    assert [s["threads"] for s in art["sweep"]] == [1, 2]
    assert all(s["decode_tok_s"] > 0 and s["prefill_tok_s"] > 0 for s in art["sweep"])
    assert art["best_threads"]["decode"] in (1, 2)
    assert run["result"]["integrity"]["ok"] and run["result"]["device"]["runtimes"]["llama-cpp-python"]
    report = (b / REPORT).read_text()
    assert bundle.DEVICE_SECTION_START in report and out["where"] in report and "1 → " in report
    check = check_bundle(b)
    assert check.passed, [f.line() for f in check.findings]
    # the device holds the recorded bundle under its final name, nothing half-copied beside it
    assert _files(device_dir) == _files(b)
    assert sorted(p.name for p in device_dir.parent.iterdir()) == ["tiny-device"]

    # model.json tells an app the threads this device ran the artifact fastest at
    described = json.loads((b / MODEL_JSON).read_text())
    entry = next(a for a in described["artifacts"] if a["path"] == "model-q8_0.gguf")
    assert entry["threads"] == {**art["best_threads"], "measured_on": out["where"]}

    # the user's own install of the Node example's dependencies, here and on the device, is not the bundle's:
    # never uploaded, never removed from the device, not a finding of `edgeft check`
    for root in (b, device_dir):
        dep = root / "examples" / "node" / "node_modules" / "dep" / "index.js"
        dep.parent.mkdir(parents=True)
        dep.write_text("export default 1;\n")
    second = _edgeft(*args, home=home)  # the key is known now: no --accept-new-host-key needed
    assert second.returncode == 0, second.stderr[-3000:]
    again = json.loads(second.stdout)
    assert again["sync"]["copied_files"] == 0 and again["sync"]["copied_bytes"] == 0
    assert again["sync"]["skipped_files"] == n_files
    assert again["comparison"]["previous_recorded"] == run["recorded"]
    assert {c["metric"] for c in again["comparison"]["changes"]} == {
        "prefill_tok_s",
        "decode_tok_s",
        "ttft_ms",
    }
    assert len(json.loads((b / MANIFEST).read_text())["device_latency"]) == 2
    assert check_bundle(b, load=False).passed
    assert _files(device_dir) == _files(b)


@pytest.mark.parametrize("which", ["final", "partial", "old"])
def test_a_device_folder_edgeft_did_not_copy_is_left_alone(
    sshd: Sshd, made: Bundles, monkeypatch: pytest.MonkeyPatch, which: str
) -> None:
    """--remote-dir pointing at the user's own folder (or its .partial/.old names holding the user's files) is
    refused in one line, and nothing in it is moved or removed."""
    b = made(f"users-{which}")
    monkeypatch.setenv("HOME", str(sshd.home(f"users-{which}")))
    device_dir = sshd.root / f"device-users-{which}" / "home-pi"
    suffix = {"final": "", "partial": remote.PARTIAL_SUFFIX, "old": ".old"}[which]
    users = Path(str(device_dir) + suffix)
    (users / ".ssh").mkdir(parents=True)
    (users / ".ssh" / "authorized_keys").write_text("ssh-ed25519 AAAA me")
    if which == "old":  # .old only matters when a copy finishes: give it an edgeft copy to replace
        (device_dir).mkdir()
        (device_dir / COPY_MARKER).write_text(json.dumps({"what": "device copy", "files": []}))
    ep = remote.resolve_endpoint(remote.parse_remote(sshd.spec), sshd.key)
    client = remote.connect(ep, accept_new_host_key=True)
    try:
        with pytest.raises(EdgeftError) as e:
            remote.sync_bundle(client, b, str(device_dir), where=ep.where, python=sys.executable)
    finally:
        client.close()
    msg = str(e.value)
    assert "\n" not in msg and "not a bundle copy edgeft made" in msg and str(users) in msg, msg
    assert (users / ".ssh" / "authorized_keys").read_text() == "ssh-ed25519 AAAA me"


def _tree(folder: Path) -> dict[str, str]:
    """Every file and folder under `folder`, links included (not followed), with its content's sha256."""
    out = {}
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder).as_posix()
        out[rel] = "link" if p.is_symlink() else "dir" if p.is_dir() else bundle.sha256_file(p)
    return out


@pytest.mark.parametrize("target", ["build-out", "user-folder", "foreign-bundle", "bundle-inside-out"])
def test_remote_dir_never_costs_the_user_a_file(
    sshd: Sshd, made: Bundles, runtime_venv: Path, target: str
) -> None:
    """--remote-dir at a build's --out folder (bundles and the user's notes), the user's own folder, a bundle
    put on the device by hand, or a bundle inside a build's --out: refused in one line before anything on the
    device is renamed or removed; the whole device tree is byte for byte what it was."""
    b = made(f"hostile-{target}")
    device = sshd.root / f"device-{target}"
    if (
        target == "build-out"
    ):  # what `edgeft build --out ~/work` leaves: its marker, a bundle, the user's notes
        rdir = device / "work"
        shutil.copytree(b, rdir / "tiny-device")
        (rdir / ".edgeft").write_text(json.dumps({"written_by": "edgeft", "what": "output folder"}))
        (rdir / "notes.txt").write_text("mine")
    elif target == "user-folder":
        rdir = device / "home-pi"
        (rdir / "projects").mkdir(parents=True)
        (rdir / "projects" / "main.py").write_text("print('mine')")
    elif target == "foreign-bundle":  # another bundle, copied by hand, with the user's file beside its files
        rdir = device / "other-bundle"
        shutil.copytree(made.fresh, rdir)
        (rdir / "notes.txt").write_text("mine")
    else:
        rdir = device / "work" / "tiny-device"
        shutil.copytree(b, rdir)
        (rdir.parent / ".edgeft").write_text(json.dumps({"written_by": "edgeft", "what": "output folder"}))
        (rdir / "notes.txt").write_text("mine")
    before = _tree(device)
    args = ("bench", str(b), "--remote", sshd.spec, "--identity", str(sshd.key), "--accept-new-host-key")
    args += ("--python", str(runtime_venv), "--remote-dir", str(rdir), *QUICK)
    res = _edgeft(*args, home=sshd.home(f"hostile-{target}"))
    line = _one_error_line(res, str(rdir), "not a bundle copy edgeft made", "nothing in it was touched")
    assert "--remote-dir" in line
    assert _tree(device) == before
    assert check_bundle(b, load=False).passed  # nothing was recorded in the bundle either


def test_the_users_files_inside_a_device_copy_are_kept(sshd: Sshd, made: Bundles, monkeypatch) -> None:
    """Files the user adds inside edgeft's own copy on the device are not edgeft's: a later copy (even of a
    bundle that no longer holds some of edgeft's files) removes only what edgeft put there."""
    b = made("users-inside")
    monkeypatch.setenv("HOME", str(sshd.home("users-inside")))
    device_dir = sshd.root / "device-users-inside" / "tiny-device"
    ep = remote.resolve_endpoint(remote.parse_remote(sshd.spec), sshd.key)
    client = remote.connect(ep, accept_new_host_key=True)
    try:
        remote.sync_bundle(client, b, str(device_dir), where=ep.where, python=sys.executable)
        (device_dir / "notes.txt").write_text("mine")
        (device_dir / "tokenizer" / "my-vocab.txt").write_text("mine")
        gone = next(
            r for r in remote.local_files(b) if r.startswith("tokenizer/") and r != "tokenizer/tokenizer.json"
        )
        assert (device_dir / gone).is_file()
        (b / gone).unlink()  # the next bundle no longer holds it: edgeft's copy of it goes
        bundles.reseal_removed(b, gone)
        remote.sync_bundle(client, b, str(device_dir), where=ep.where, python=sys.executable)
    finally:
        client.close()
    assert (device_dir / "notes.txt").read_text() == "mine"
    assert (device_dir / "tokenizer" / "my-vocab.txt").read_text() == "mine"
    assert not (device_dir / gone).exists()
    record = json.loads((device_dir / COPY_MARKER).read_text())["files"]
    assert "notes.txt" not in record and MANIFEST in record


def test_the_demo_bundle_benched_over_ssh(
    sshd: Sshd, demo_bundle: Path, runtime_venv: Path, tmp_path: Path
) -> None:
    """The README demo's bundle (the GGUF and the ONNX artifact the search chose) benched on the "device" over SSH in a
    runtime-only venv: every artifact measured with a thread sweep and recorded; the bundle still checks."""
    b = tmp_path / "raspberrypi"
    shutil.copytree(demo_bundle, b)
    device_dir = sshd.root / "device-demo" / "raspberrypi"
    res = _edgeft(
        "bench",
        str(b),
        "--remote",
        sshd.spec,
        "--identity",
        str(sshd.key),
        "--accept-new-host-key",
        "--python",
        str(runtime_venv),
        "--remote-dir",
        str(device_dir),
        *QUICK,
        "--json",
        home=sshd.home("demo"),
    )
    assert res.returncode == 0, res.stderr[-3000:]
    [run] = json.loads((b / MANIFEST).read_text())["device_latency"]
    arts = {a["path"]: a for a in run["result"]["artifacts"]}
    shipped = json.loads((demo_bundle / MANIFEST).read_text())["artifacts"]
    assert set(arts) == {a["path"] for a in shipped} and len(arts) == 2
    for a in arts.values():
        assert a["status"] == "ok" and [s["threads"] for s in a["sweep"]] == [1, 2], a
        assert a["decode_tok_s"] > 0 and a["decode_bytes_per_token"] > 0 and a["effective_gb_s"] > 0
    assert check_bundle(b, load=False).passed
    assert _files(device_dir) == _files(b)


def test_a_killed_copy_is_picked_up_by_the_next(
    sshd: Sshd, made: Bundles, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A copy killed midway leaves `<dir>.partial` with `.part` files: the next copy keeps what is whole,
    removes the rest, and only then takes the final name."""
    b = made("killed")
    monkeypatch.setenv("HOME", str(sshd.home("killed")))
    device_dir = sshd.root / "device-killed" / "tiny-device"
    partial = Path(str(device_dir) + remote.PARTIAL_SUFFIX)
    (partial / "tokenizer").mkdir(parents=True)
    # written first by every copy: the partial folder is edgeft's, and what the killed copy put there
    record = ["tokenizer/stale.json", MANIFEST, "model-q8_0.gguf", REPORT]
    (partial / COPY_MARKER).write_text(json.dumps({"what": "device copy", "files": record}))
    shutil.copy(b / MANIFEST, partial / MANIFEST)  # whole: kept
    (partial / "model-q8_0.gguf.part").write_bytes(b"GGUF half")  # an unfinished upload
    (partial / "tokenizer" / "stale.json").write_text("{}")  # an earlier bundle's, not this one's: removed
    (partial / REPORT).write_text("older report")  # changed: copied again
    ep = remote.resolve_endpoint(remote.parse_remote(sshd.spec), sshd.key)
    client = remote.connect(ep, accept_new_host_key=True)
    try:
        rep = remote.sync_bundle(client, b, str(device_dir), where=ep.where, python=sys.executable)
        n = len(remote.local_files(b))
        assert rep.skipped_files == 1 and rep.copied_files == n - 1 and MANIFEST not in rep.copied
        assert rep.remote_dir == str(device_dir) and not partial.exists()
        assert _files(device_dir) == _files(b)
        # after recording only the named files are re-hashed; the rest are compared by size
        (device_dir / REPORT).write_text("x" * (b / REPORT).stat().st_size)  # same size, other bytes
        (device_dir / "tokenizer" / "tokenizer.json").write_text("{}")  # another size
        rep = remote.sync_bundle(
            client, b, str(device_dir), where=ep.where, python=sys.executable, changed=[REPORT]
        )
        assert sorted(rep.copied) == [REPORT, "tokenizer/tokenizer.json"]
        assert _files(device_dir) == _files(b)
    finally:
        client.close()


def _running(needle: str) -> bool:
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        with contextlib.suppress(OSError):
            if needle in cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace"):
                return True
    return False


def test_commands_report_output_and_a_timeout_stops_them_on_the_device(
    sshd: Sshd, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HOME", str(sshd.home("commands")))
    ep = remote.resolve_endpoint(remote.parse_remote(sshd.spec), sshd.key)
    client = remote.connect(ep, accept_new_host_key=True)
    try:
        done = remote.run_command(client, "echo out; echo err >&2; exit 3", where=ep.where, timeout=30)
        assert (done.returncode, done.stdout, done.stderr) == (3, "out\n", "err\n")
        t0 = time.monotonic()
        with pytest.raises(EdgeftError, match="ran past 1 s and was stopped; raise --timeout"):
            remote.run_command(client, "sleep 41.25 & sleep 41.5; echo never", where=ep.where, timeout=1)
        assert time.monotonic() - t0 < 10
    finally:
        client.close()
    deadline = time.monotonic() + 5
    while (_running("sleep 41.25") or _running("sleep 41.5")) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _running("sleep 41.25") and not _running("sleep 41.5")  # the whole process group ended


def test_a_changed_host_key_is_refused(sshd: Sshd, made: Bundles, tmp_path: Path) -> None:
    home = sshd.home("changed")
    _keygen(tmp_path / "other")
    other = (tmp_path / "other.pub").read_text().split()
    (home / ".ssh" / "known_hosts").write_text(f"[127.0.0.1]:{sshd.port} {other[0]} {other[1]}\n")
    before = _files(made.fresh)
    args = ("bench", str(made.fresh), "--remote", sshd.spec, "--identity", str(sshd.key))
    res = _edgeft(*args, "--accept-new-host-key", "--remote-dir", str(tmp_path / "dev"), home=home)
    _one_error_line(res, sshd.spec, "host key changed", f"ssh-keygen -R '[127.0.0.1]:{sshd.port}'")
    assert _files(made.fresh) == before and not (tmp_path / "dev").exists()
    assert (home / ".ssh" / "known_hosts").read_text().count("\n") == 1  # never overwritten


def test_an_unknown_host_key_needs_accept_new(sshd: Sshd, made: Bundles, tmp_path: Path) -> None:
    home = sshd.home("unknown")
    args = ("bench", str(made.fresh), "--remote", sshd.spec, "--identity", str(sshd.key))
    res = _edgeft(*args, "--remote-dir", str(tmp_path / "dev"), home=home)
    _one_error_line(res, sshd.spec, "is not in", "--accept-new-host-key", "SHA256:")
    assert not (home / ".ssh" / "known_hosts").exists() and not (tmp_path / "dev").exists()


def test_a_wrong_key_fails_authentication(sshd: Sshd, made: Bundles, tmp_path: Path) -> None:
    _keygen(tmp_path / "stranger")
    home = sshd.home("stranger")
    args = ("bench", str(made.fresh), "--remote", sshd.spec, "--identity", str(tmp_path / "stranger"))
    res = _edgeft(*args, "--accept-new-host-key", home=home)
    _one_error_line(res, sshd.spec, "authentication failed", "--identity")


def test_an_unreachable_host_is_one_line(made: Bundles, tmp_path: Path) -> None:
    port = _free_port()  # nothing listens there
    home = tmp_path / "home"
    home.mkdir()
    res = _edgeft(
        "bench", str(made.fresh), "--remote", f"pi@127.0.0.1:{port}", "--connect-timeout", "5", home=home
    )
    _one_error_line(res, f"pi@127.0.0.1:{port}", "connection refused", "ssh")


def test_a_host_that_never_answers_times_out_in_one_line(made: Bundles, tmp_path: Path) -> None:
    """A port that accepts TCP but never speaks SSH (a hung board, a blackholing firewall): the connect
    timeout ends it in one line, not a hang."""
    home = tmp_path / "home"
    home.mkdir()
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(1)  # the kernel completes the handshake; nobody ever sends a banner
        port = silent.getsockname()[1]
        t0 = time.monotonic()
        res = _edgeft(
            "bench", str(made.fresh), "--remote", f"pi@127.0.0.1:{port}", "--connect-timeout", "2", home=home
        )
        took = time.monotonic() - t0
    _one_error_line(res, f"pi@127.0.0.1:{port}", "timeout")
    assert took < 60, took


def test_a_missing_remote_python_is_one_line(sshd: Sshd, made: Bundles, tmp_path: Path) -> None:
    home = sshd.home("nopython")
    args = (
        "bench",
        str(made.fresh),
        "--remote",
        sshd.spec,
        "--identity",
        str(sshd.key),
        "--accept-new-host-key",
    )
    res = _edgeft(*args, "--python", "python3-nowhere", "--remote-dir", str(tmp_path / "dev"), home=home)
    _one_error_line(res, sshd.spec, "python3-nowhere was not found", "--python")


# --- on this machine -----------------------------------------------------------------------------------------


def test_local_bench_records_localhost_and_warns_of_a_slowdown(
    made: Bundles, runtime_venv: Path, tmp_path: Path
) -> None:
    b = made("local")
    # an earlier run of this machine far faster than any real one: the new run must be flagged
    fast = _result(1e9, prefill=1e9, ttft=1e-6)
    fast["settings"] = {"prompt_tokens": 8, "decode_tokens": 4, "runs": 1, "threads": [1, 2]}  # as QUICK
    bundle.record_device_run(b, fast, "localhost")
    res = _edgeft("bench", str(b), "--python", str(runtime_venv), *QUICK, home=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "recorded in" in res.stderr and "model-q8_0.gguf: prefill" in res.stderr
    warnings = [
        ln for ln in res.stderr.splitlines() if ln.startswith("warning: localhost: slower than the run")
    ]
    assert [w.split(": ")[-1].split(" ")[1:3] for w in warnings] == [
        ["prefill", "tok/s"],
        ["decode", "tok/s"],
        ["TTFT", "ms"],
    ]
    runs = json.loads((b / MANIFEST).read_text())["device_latency"]
    assert [r["where"] for r in runs] == ["localhost", "localhost"]
    assert len(runs[1]["result"]["artifacts"][0]["sweep"]) == 2
    assert "Slower than the previous run" in (b / REPORT).read_text()
    assert check_bundle(b, load=False).passed


# --- command line and parsing ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        ((), ("BUNDLE", "--artifact")),
        (("BUNDLE", "--artifact", "m.gguf"), ("not both",)),
        (("--artifact", "m.gguf", "--remote", "pi@h"), ("--remote", "not --artifact")),
        (("BUNDLE", "--thread-sweep", "1,x"), ("--thread-sweep '1,x'",)),
        (("BUNDLE", "--remote", "pi@host:99999"), ("port 1-65535",)),
        (("BUNDLE", "--identity", "k"), ("need --remote",)),
    ],
)
def test_bench_arguments_are_one_line(
    made: Bundles, tmp_path: Path, args: tuple[str, ...], needles: tuple[str, ...]
) -> None:
    args = tuple(str(made.fresh) if a == "BUNDLE" else a for a in args)
    _one_error_line(_edgeft("bench", *args, home=tmp_path), *needles)


@pytest.mark.parametrize(
    ("spec", "want"),
    [
        ("pi@raspberrypi.local", remote.RemoteSpec("pi", "raspberrypi.local", None)),
        ("root@127.0.0.1:2222", remote.RemoteSpec("root", "127.0.0.1", 2222)),
        ("myboard", remote.RemoteSpec(None, "myboard", None)),
        ("me@[::1]:22", remote.RemoteSpec("me", "::1", 22)),
    ],
)
def test_parse_remote(spec: str, want: remote.RemoteSpec) -> None:
    assert remote.parse_remote(spec) == want


@pytest.mark.parametrize("spec", ["", "a@b@c", "pi@host:0", "pi@host:port", "pi@", "pi@ho st"])
def test_parse_remote_refuses(spec: str) -> None:
    with pytest.raises(EdgeftError, match="expected user@host"):
        remote.parse_remote(spec)


def test_ssh_config_supplies_hostname_user_port_and_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / ".ssh").mkdir()
    (tmp_path / ".ssh" / "id_board").write_text("not used here")
    (tmp_path / ".ssh" / "config").write_text(
        "Host board\n  HostName 10.1.2.3\n  User pi\n  Port 2200\n  IdentityFile ~/.ssh/id_board\n"
    )
    ep = remote.resolve_endpoint(remote.parse_remote("board"))
    assert (ep.hostname, ep.user, ep.port) == ("10.1.2.3", "pi", 2200)
    assert ep.identities == (str(tmp_path / ".ssh" / "id_board"),)
    assert ep.known_hosts == tmp_path / ".ssh" / "known_hosts" and ep.where == "pi@board:2200"
    ep = remote.resolve_endpoint(remote.parse_remote("root@board:22"))  # what is typed wins
    assert (ep.user, ep.port, ep.where) == ("root", 22, "root@board")


def test_ssh_config_proxy_command_and_proxy_jump(sshd: Sshd, monkeypatch: pytest.MonkeyPatch) -> None:
    """A ProxyCommand from ~/.ssh/config carries the connection (here OpenSSH's own `ssh -W` through the
    same server, with its own throwaway known_hosts); ProxyJump becomes `ssh -W host:port ssh://jump`."""
    home = sshd.home("proxy")
    monkeypatch.setenv("HOME", str(home))
    relay = (
        f"ssh -F /dev/null -i {sshd.key} -p {sshd.port} -o UserKnownHostsFile={home / 'relay_known_hosts'} "
        f"-o StrictHostKeyChecking=accept-new -o BatchMode=yes {sshd.user}@127.0.0.1 -W %h:%p"
    )
    (home / ".ssh" / "config").write_text(
        f"Host viarelay\n  HostName 127.0.0.1\n  Port {sshd.port}\n  User {sshd.user}\n"
        f"  IdentityFile {sshd.key}\n  ProxyCommand {relay}\n"
        "Host behind\n  HostName 10.0.0.7\n  ProxyJump pi@gate:2222\n"
    )
    ep = remote.resolve_endpoint(remote.parse_remote("viarelay"))
    assert ep.proxy_command and f"127.0.0.1:{sshd.port}" in ep.proxy_command  # %h:%p expanded
    client = remote.connect(ep, accept_new_host_key=True)
    try:
        assert remote.run_command(client, "echo through", where=ep.where, timeout=30).stdout == "through\n"
    finally:
        client.close()
    assert (home / "relay_known_hosts").is_file()  # the relay's ssh really ran
    jump = remote.resolve_endpoint(remote.parse_remote("behind"))
    assert jump.proxy_command == "ssh -W 10.0.0.7:22 ssh://pi@gate:2222"


# --- regressions ---------------------------------------------------------------------------------------------


def _result(decode: float, prefill: float = 400.0, ttft: float = 20.0, prompt_tokens: int = 64) -> dict:
    art = {
        "path": "model-q8_0.gguf",
        "format": "gguf",
        "status": "ok",
        "reason": None,
        "install": None,
        "sweep": [
            {
                "threads": 2,
                "prefill_tok_s": prefill,
                "decode_tok_s": decode,
                "ttft_ms": ttft,
                "peak_rss_mb": 50,
            }
        ],
        "best_threads": {"prefill": 2, "decode": 2},
        "prefill_tok_s": prefill,
        "decode_tok_s": decode,
        "ttft_ms": ttft,
        "peak_rss_mb": 50.0,
        "decode_bytes_per_token": None,
        "effective_gb_s": None,
    }
    return {
        "schema": 1,
        "bundle": "x",
        "started": "2026-01-01T00:00:00Z",
        "finished": "2026-01-01T00:00:09Z",
        "integrity": {"ok": True, "files_checked": 9, "problems": []},
        "device": {
            "hostname": "pi5",
            "machine": "aarch64",
            "cpu_model": "Cortex-A76",
            "cores": 4,
            "cpu_features": ["fp", "asimd", "asimddp", "cpuid"],
        },
        "settings": {"prompt_tokens": prompt_tokens, "decode_tokens": 64, "runs": 3, "threads": [1, 2, 4]},
        "artifacts": [art],
    }


def test_a_slowdown_beyond_noise_is_flagged(made: Bundles) -> None:
    b = made("regress")
    assert bundle.record_device_run(b, _result(30.0), "pi@board")["previous_recorded"] is None
    same = bundle.record_device_run(b, _result(28.0), "pi@board")  # 7% slower: within the 10% noise
    assert same["previous_recorded"] and same["regressions"] == []
    other = bundle.record_device_run(
        b, _result(5.0), "pi@other"
    )  # another device: not compared with pi@board
    assert other["previous_recorded"] is None and other["regressions"] == []
    slow = bundle.record_device_run(b, _result(15.0, prefill=410.0, ttft=30.0), "pi@board")
    assert [(r["metric"], r["previous"], r["current"]) for r in slow["regressions"]] == [
        ("decode_tok_s", 28.0, 15.0),
        ("ttft_ms", 20.0, 30.0),
    ]
    assert [r["threshold"] for r in slow["regressions"]] == [0.10, 0.10]  # 30 → 28 spread 7%: the floor
    report = (b / REPORT).read_text()
    assert "Slower than the previous run" in report and "decode tok/s 28 → 15" in report
    assert report.count(bundle.DEVICE_SECTION_START) == 1 and "### pi@other" in report
    assert "pi5: Cortex-A76 (aarch64, 4 cores" in report and "ISA neon dotprod (of 4 CPU flags)" in report
    assert check_bundle(b, load=False).passed
    m = json.loads((b / MANIFEST).read_text())
    assert [r["where"] for r in m["device_latency"]] == ["pi@board", "pi@board", "pi@other", "pi@board"]
    assert (b / SHA256SUMS).read_text().count("\n") == len(m["files"]) + 1


def test_runs_with_other_settings_are_not_compared(made: Bundles) -> None:
    """A run with a longer prompt is not a regression of one with a short prompt: not compared at all."""
    b = made("settings")
    bundle.record_device_run(b, _result(30.0, ttft=20.0, prompt_tokens=8), "pi@board")
    longer = bundle.record_device_run(b, _result(30.0, ttft=160.0, prompt_tokens=64), "pi@board")
    assert longer["previous_recorded"] is None and longer["regressions"] == []
    again = bundle.record_device_run(b, _result(30.0, ttft=200.0, prompt_tokens=64), "pi@board")
    assert again["previous_recorded"] and [r["metric"] for r in again["regressions"]] == ["ttft_ms"]
    assert "64-token prompt, 64 decoded tokens" in (b / REPORT).read_text()


def test_noisy_history_raises_the_threshold(made: Bundles) -> None:
    """Earlier runs spread 40% apart: a 25% slowdown is within that device's own noise."""
    b = made("noisy")
    for decode in (30.0, 20.0, 28.0):
        bundle.record_device_run(b, _result(decode), "pi@board")
    cmp = bundle.record_device_run(b, _result(21.0), "pi@board")
    [decode] = [c for c in cmp["changes"] if c["metric"] == "decode_tok_s"]
    assert decode["slowdown"] == pytest.approx(0.25)
    assert decode["threshold"] == pytest.approx(10 / 28, abs=1e-4)
    assert not decode["regression"]


def test_runs_recorded_at_once_are_all_kept(made: Bundles) -> None:
    b = made("concurrent")

    def record(where: str) -> None:
        for i in range(6):
            bundle.record_device_run(b, _result(30.0 + i), where)

    threads = [threading.Thread(target=record, args=(f"pi@board{n}",)) for n in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    runs = json.loads((b / MANIFEST).read_text())["device_latency"]
    assert sorted(r["where"] for r in runs) == sorted(f"pi@board{n}" for n in range(3) for _ in range(6))
    assert check_bundle(b, load=False).passed


def test_record_is_atomic_and_keeps_hostile_text_out_of_the_table(made: Bundles) -> None:
    b = made("hostile")
    before = copy.deepcopy(json.loads((b / MANIFEST).read_text()))
    evil = _result(30.0)
    evil["device"]["hostname"] = "pi|5\n# injected"
    evil["artifacts"][0]["decode_tok_s"] = "fast"
    bundle.record_device_run(b, evil, "pi@board")
    report = (b / REPORT).read_text()
    assert "\n# injected" not in report and "pi/5 # injected" in report
    assert check_bundle(b, load=False).passed
    after = json.loads((b / MANIFEST).read_text())
    assert {k: v for k, v in after.items() if k not in ("device_latency", "files")} == {
        k: v for k, v in before.items() if k != "files"
    }
    assert not [p for p in b.parent.iterdir() if p.name != b.name]  # no temp folder left beside it


# --- a hostile device -------------------------------------------------------------------------------------------


def _fake_device_python(folder: Path, answer: str) -> Path:
    """The device's `python`: edgeft's copy helpers (`python -I -c CODE`) run for real; the benchmark script
    is answered by `answer`, a shell command standing in for what a hostile device prints."""
    fake = folder / "python3"
    fake.write_text(f'#!/bin/sh\nif [ "$2" = "-c" ]; then exec {sys.executable} "$@"; fi\n{answer}\n')
    fake.chmod(0o755)
    return fake


def _bench_with(sshd: Sshd, b: Path, fake: Path, name: str) -> subprocess.CompletedProcess[str]:
    args = ("bench", str(b), "--remote", sshd.spec, "--identity", str(sshd.key), "--accept-new-host-key")
    args += ("--python", str(fake), "--remote-dir", str(sshd.root / f"device-{name}" / "b"), *QUICK)
    return _edgeft(*args, home=sshd.home(name))


def _strict_json(path: Path) -> dict:
    def refuse(name: str) -> None:
        raise ValueError(f"{name} in {path}")

    return json.loads(path.read_text(), parse_constant=refuse)


def test_a_hostile_device_result_is_recorded_within_bounds(sshd: Sshd, made: Bundles, tmp_path: Path) -> None:
    """NaN, Infinity, a 400-digit number, thread counts of -7 and 10^12, a 2 MB string, ANSI escapes, HTML and
    report.md's own section marker in a hostname: recorded as typed, bounded JSON (the odd values null, with
    why), shown escaped, and the bundle still passes `edgeft check`; a normal run afterwards replaces the
    device section whole."""
    b = made("hostile-result")
    before_model = (b / MODEL_JSON).read_text()
    art = {
        "path": "model-q8_0.gguf",
        "status": "ok",
        "reason": None,
        "sweep": [{"threads": 10**12, "prefill_tok_s": 1.0, "decode_tok_s": 1.0, "ttft_ms": 1.0}],
        "best_threads": {"decode": -7, "prefill": 10**12},
        "prefill_tok_s": float("inf"),
        "decode_tok_s": float("nan"),
        "ttft_ms": 12.5,
        "note": "x" * 2_000_000,
    }
    evil = "\x1b[2J\x1b[32mok: all good <script>alert(1)</script> " + bundle.DEVICE_SECTION_END
    result = {
        "schema": RESULT_SCHEMA,
        "integrity": {"ok": True, "files_checked": 3, "problems": []},
        "device": {"hostname": evil, "cores": 4, "cpu_model": evil},
        "settings": {"prompt_tokens": 8, "decode_tokens": 4, "runs": 1, "threads": [1, 2]},
        "artifacts": [art, {**art, "path": "onnx-int8", "status": "failed", "reason": evil}],
    }
    text = json.dumps(result).replace('"ttft_ms": 12.5', '"ttft_ms": 1' + "0" * 400)
    planted = tmp_path / "result.json"
    planted.write_text(text)
    res = _bench_with(sshd, b, _fake_device_python(tmp_path, f"cat {planted}"), "hostile-result")
    assert "\x1b" not in res.stdout + res.stderr, res.stderr[-2000:]
    assert res.returncode == 2 and "onnx-int8" in res.stderr  # the failed artifact, one line
    m = _strict_json(b / MANIFEST)
    [run] = m["device_latency"]
    got = run["result"]["artifacts"][0]
    assert got["decode_tok_s"] is None and got["prefill_tok_s"] is None and got["ttft_ms"] is None
    assert got["best_threads"] is None and got["sweep"] == [] and len(got["note"]) == 1000
    notes = " ".join(run["result"]["sanitized"])
    assert "not a finite number" in notes and "does not fit a double" in notes and "thread counts" in notes
    assert len((b / MANIFEST).read_bytes()) < 200_000
    assert (b / MODEL_JSON).read_text() == before_model  # no thread count from this run reached model.json
    report = (b / REPORT).read_text()
    assert "<script>" not in report and "&lt;script&gt;" in report and "\x1b" not in report
    assert report.count(bundle.DEVICE_SECTION_START) == 1 and report.count(bundle.DEVICE_SECTION_END) == 1
    assert check_bundle(b, load=False).passed
    # a plain run afterwards: the hostile section is replaced whole, nothing of it left behind
    plain = {
        **result,
        "device": {"hostname": "pi5", "cores": 4},
        "artifacts": [_result(30.0)["artifacts"][0]],
    }
    planted.write_text(json.dumps(plain))
    again = _bench_with(sshd, b, _fake_device_python(tmp_path, f"cat {planted}"), "hostile-result-again")
    assert again.returncode == 0, again.stderr[-2000:]
    report = (b / REPORT).read_text()
    assert (
        "alert"
        not in report.split(bundle.DEVICE_SECTION_START)[0] + report.split(bundle.DEVICE_SECTION_END)[1]
    )
    assert check_bundle(b, load=False).passed


@pytest.mark.parametrize(
    ("name", "answer", "says"),
    [
        ("endless", "yes xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx | head -c 300000000",
         "printed more than 4 MB"),
        ("deep", "python3 -c \"print('[' * 100000 + ']' * 100000)\"", "nested too deeply"),
        ("deep-object", "python3 -c \"print('{\\\"schema\\\": 1, \\\"a\\\": ' + '[' * 100000 + ']' * 100000 + '}')\"",
         "nested too deeply"),
    ],
)  # fmt: skip
def test_a_device_that_floods_or_nests_is_one_line(
    sshd: Sshd, made: Bundles, tmp_path: Path, name: str, answer: str, says: str
) -> None:
    """300 MB of output, or JSON nested 100,000 deep: one line, host memory bounded, nothing recorded."""
    b = made(f"flood-{name}")
    before = _files(b)
    fake = _fake_device_python(tmp_path, answer)
    args = ("bench", str(b), "--remote", sshd.spec, "--identity", str(sshd.key), "--accept-new-host-key")
    args += ("--python", str(fake), "--remote-dir", str(sshd.root / f"device-flood-{name}" / "b"), *QUICK)
    # edgeft as the only child of a small Python, which reports that child's peak memory
    peak = "import resource, subprocess, sys; r = subprocess.run(sys.argv[1:]); "
    peak += "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr); sys.exit(r.returncode)"
    env = dict(os.environ, HOME=str(sshd.home(f"flood-{name}")), COLUMNS="200")
    env.pop("SSH_AUTH_SOCK", None)
    res = subprocess.run(
        [sys.executable, "-c", peak, sys.executable, "-m", "edgeft", *args],
        capture_output=True, text=True, timeout=600, env=env,
    )  # fmt: skip
    peak_mb = int(res.stderr.strip().splitlines()[-1]) / 1024
    res = subprocess.CompletedProcess(
        res.args, res.returncode, res.stdout, "\n".join(res.stderr.splitlines()[:-1])
    )
    _one_error_line(res, says)
    assert _files(b) == before
    assert peak_mb < 1000, peak_mb  # edgeft with torch imported: a few hundred MB; 300 MB of output is more


def test_a_bundle_with_other_device_code_is_not_run_on_the_device(
    sshd: Sshd, made: Bundles, tmp_path: Path
) -> None:
    """A bundle whose bench_on_device.py is not this edgeft's (digests made consistent): refused before
    anything is copied; edgeft runs only its own code on a device."""
    b = made("other-script")
    planted = (b / remote.DEVICE_SCRIPT).read_text() + "\nopen('/tmp/edgeft-pwned', 'w')\n"
    bundles.reseal(b, {remote.DEVICE_SCRIPT: planted})
    device = sshd.root / "device-other-script"
    args = ("bench", str(b), "--remote", sshd.spec, "--identity", str(sshd.key), "--accept-new-host-key")
    res = _edgeft(*args, "--remote-dir", str(device / "b"), *QUICK, home=sshd.home("other-script"))
    _one_error_line(res, remote.DEVICE_SCRIPT, "not this edgeft's", "rebuild the bundle")
    assert not device.exists()
