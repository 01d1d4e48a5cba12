"""``Machine``: one booted QEMU machine and its agent on a virtio-serial port.

The machine boots the cached kernel and initramfs with the 9p share (the
directory holding the ``kvmmem`` package), a fresh ext4 scratch disk, an
``ivshmem-plain`` device and the virtio-serial port; ``/init`` starts the agent,
which announces itself with a ``ready`` line.  QEMU runs in its own process group
with ``PR_SET_PDEATHSIG`` = SIGKILL, and a finalizer (also run at interpreter exit)
kills it, so no QEMU outlives the Python process.  The death signal follows the
*thread* that started QEMU: start machines from a thread that lives as long as
they do (the main thread, or a worker that closes its machines before it ends).
"""

from __future__ import annotations

import contextlib
import ctypes
import itertools
import json
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import weakref
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import kvmmem
from kvmmem.machine.cache import VFIO_CPIO, Manifest, load_manifest, load_vfio_info, machine_dir
from kvmmem.machine.catalog import MachineSpec, get_machine
from kvmmem.machine.errors import AgentError, MachineError, MachineUnavailable
from kvmmem.machine.initramfs import PORT_NAME, SHARE_TAG, SHELL_FLAG, init_overlay

PR_SET_PDEATHSIG = 1
VFIO_SLOT = 0x10
"""PCI slot of the ivshmem-plain device set aside for ``vfio-bar`` mappings (bus 0 on
every machine); the kernel command line names it as ``kvmmem.vfio=0000:00:10.0``."""
DEFAULT_READY_TIMEOUT = 120.0
DEFAULT_REQUEST_TIMEOUT = 60.0


def default_share() -> Path:
    """Returns the directory that contains the ``kvmmem`` package (exported over 9p)."""
    return Path(kvmmem.__file__).resolve().parent.parent


def require_qemu(spec: MachineSpec) -> str:
    """Returns the path of the machine's QEMU binary; raises
    :class:`MachineUnavailable` naming the Debian package to install."""
    path = shutil.which(spec.qemu_binary)
    if path is None:
        raise MachineUnavailable(
            f"{spec.qemu_binary} not found: apt-get install {spec.qemu_package}")
    return path


def require_manifest(spec: MachineSpec, root: Path | None = None) -> Manifest:
    """Returns the manifest of a fetched machine; raises :class:`MachineUnavailable`
    saying how to fetch it."""
    manifest = load_manifest(spec, root)
    if manifest is None:
        raise MachineUnavailable(
            f"machine {spec.name} not fetched: run kvmmem machine fetch "
            f"{spec.arch} {spec.version}")
    return manifest


def _pdeathsig() -> None:  # pragma: no cover - runs in the child before exec
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        pass


_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\r")


def console_tail(path: Path, lines: int = 8) -> str:
    """Returns the last ``lines`` non-empty lines of a console log joined with
    `` | `` (one line for an error message), or ``(no console output)``."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 8192))
            text = f.read().decode("utf-8", "replace")
    except OSError:
        return "(no console output)"
    rows = [ln.strip() for ln in _ANSI.sub("", text).splitlines() if ln.strip()]
    return " | ".join(rows[-lines:]) if rows else "(no console output)"


class _Resources:
    """What must be released when a machine goes away: QEMU, its socket, its temp dir.
    Held apart from :class:`Machine` so the finalizer does not keep it alive."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.proc: subprocess.Popen[bytes] | None = None
        self.sock: socket.socket | None = None

    def kill(self) -> int | None:
        """Kills QEMU's process group, reaps QEMU; returns its exit status."""
        proc = self.proc
        if proc is None:
            return None
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                proc.kill()
        try:
            return proc.wait(timeout=10)
        except subprocess.TimeoutExpired:  # pragma: no cover - SIGKILL does not time out
            return None

    def cleanup(self) -> None:
        """Kills QEMU, closes the socket and removes the temp dir (idempotent)."""
        self.kill()
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        shutil.rmtree(self.workdir, ignore_errors=True)


class Machine:
    """A machine of the catalog booted under QEMU, serving requests to its agent.

    ``Machine(arch, version)`` checks the machine is fetched and QEMU is there
    (else :class:`MachineUnavailable`); :meth:`start` (or ``with``) boots it and
    waits for the agent's ready line; :meth:`request` sends one request;
    :meth:`close` shuts it down, kills QEMU if needed and removes the temp dir."""

    def __init__(self, arch: str, version: str, *, root: Path | None = None,
                 share: Path | None = None, ready_timeout: float = DEFAULT_READY_TIMEOUT,
                 memory: str = "1G", scratch_mib: int = 64, ivshmem_mib: int = 16,
                 vfio_bar_mib: int = 1024, cmdline: Sequence[str] = (),
                 console_log: Path | None = None) -> None:
        self.spec = get_machine(arch, version)
        self.manifest = require_manifest(self.spec, root)
        self.qemu = require_qemu(self.spec)
        self.directory = machine_dir(self.spec, root)
        self.share = share or default_share()
        self.ready_timeout = ready_timeout
        self.memory = memory
        self.scratch_mib = scratch_mib
        self.ivshmem_mib = ivshmem_mib
        self.vfio_bar_mib = vfio_bar_mib
        """Size of the second ivshmem-plain device's BAR 2, the ``vfio-bar`` source
        (a power of two; 0: no such device).  1 GiB lets a mapping take a PUD leaf; its
        pages cost the host nothing until a scenario touches them."""
        self.extra_cmdline = tuple(cmdline)
        self._console_log = console_log
        self.ready: dict[str, Any] | None = None
        """The agent's ready line once started."""
        self.boot_seconds: float | None = None
        """Seconds from starting QEMU to the ready line."""
        self.console_output = ""
        """The console log's text (its last 64 KiB), saved when the machine closes."""
        self._ids = itertools.count(1)
        self._buffer = b""
        self._res: _Resources | None = None
        self._finalizer: Callable[[], object] | None = None

    @property
    def arch(self) -> str:
        """The machine's architecture (``arm64``, ``riscv``, ``x86``)."""
        return self.spec.arch

    @property
    def version(self) -> str:
        """The catalog version, e.g. ``7.3-16k``."""
        return self.spec.version

    @property
    def name(self) -> str:
        """``ARCH-VERSION``."""
        return self.spec.name

    @property
    def release(self) -> str:
        """The kernel release (``uname -r``): the ready line's once booted, else the
        manifest's."""
        if self.ready is not None and isinstance(self.ready.get("release"), str):
            return str(self.ready["release"])
        return self.manifest.kernel_release

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"<Machine {self.spec.name} {self.manifest.kernel_release} {state}>"

    # -- paths and command line ---------------------------------------------------

    @property
    def workdir(self) -> Path | None:
        """The per-boot temp dir (socket, console log, scratch image), or ``None``."""
        return self._res.workdir if self._res else None

    @property
    def console_log(self) -> Path | None:
        """The console log of the current boot, or ``None`` before start."""
        if self._console_log is not None:
            return self._console_log
        return self._res.workdir / "console.log" if self._res else None

    @property
    def pid(self) -> int | None:
        """QEMU's process id while it runs."""
        return self._res.proc.pid if self._res and self._res.proc else None

    @property
    def running(self) -> bool:
        """Whether QEMU is alive."""
        return bool(self._res and self._res.proc and self._res.proc.poll() is None)

    def kernel_cmdline(self, shell: bool = False) -> str:
        """Returns the kernel command line (kernel-matrix.md §2)."""
        args = [f"console={self.spec.console}", "rdinit=/init", "panic=-1", "quiet",
                "cryptomgr.notests", "rodata=off", f"hugepages={self.spec.hugepages}",
                *self.spec.kernel_args]
        if self.vfio_bar_mib:
            args.append(f"kvmmem.vfio=0000:00:{VFIO_SLOT:02x}.0")
        if shell:
            args.append(SHELL_FLAG)
        return " ".join([*args, *self.extra_cmdline])

    def qemu_command(self, workdir: Path, shell: bool = False) -> list[str]:
        """Returns QEMU's argument vector for a boot using ``workdir``."""
        spec = self.spec
        cmd = [self.qemu, *spec.qemu_machine_args, "-smp", "1", "-m", self.memory,
               "-no-reboot", "-nic", "none",
               "-kernel", str(self.directory / self.manifest.kernel),
               "-initrd", str(workdir / "initrd.cpio"),
               "-append", self.kernel_cmdline(shell)]
        if spec.arch == "x86":
            cmd += ["-vga", "none"]
        if shell:
            cmd += ["-nographic"]
        else:
            log = self.console_log or workdir / "console.log"
            cmd += ["-display", "none", "-monitor", "none", "-serial", f"file:{log}",
                    "-device", "virtio-serial-pci",
                    "-chardev", f"socket,id=ch0,path={workdir / 'agent.sock'},server=on,wait=off",
                    "-device", f"virtserialport,chardev=ch0,name={PORT_NAME}"]
        cmd += ["-virtfs", f"local,path={self.share},mount_tag={SHARE_TAG},"
                "security_model=none,readonly=on"]
        if self.scratch_mib:
            cmd += ["-drive", f"file={workdir / 'scratch.img'},format=raw,if=none,"
                    "id=scratch,cache=unsafe", "-device", "virtio-blk-pci,drive=scratch"]
        if self.ivshmem_mib:
            cmd += ["-object", f"memory-backend-ram,id=ivmem,size={self.ivshmem_mib}M",
                    "-device", "ivshmem-plain,memdev=ivmem"]
        if self.vfio_bar_mib:
            cmd += ["-object", f"memory-backend-ram,id=vfiomem,size={self.vfio_bar_mib}M",
                    "-device", f"ivshmem-plain,memdev=vfiomem,addr={VFIO_SLOT:#x}"]
        return cmd

    def _prepare(self, workdir: Path) -> None:
        """Writes the boot's initrd (the cached initramfs, the vfio modules' archive when
        fetched, and the current ``/init``) and the scratch disk into ``workdir``."""
        initrd = workdir / "initrd.cpio"
        shutil.copyfile(self.directory / self.manifest.initramfs, initrd)
        vfio = load_vfio_info(self.spec, self.manifest, self.directory.parent)
        with open(initrd, "ab") as f:
            if self.vfio_bar_mib and vfio is not None and "error" not in vfio:
                f.write((self.directory / VFIO_CPIO).read_bytes())
            f.write(init_overlay())
        self._make_scratch(workdir)

    def _make_scratch(self, workdir: Path) -> None:
        if not self.scratch_mib:
            return
        mkfs = shutil.which("mkfs.ext4") or shutil.which("mkfs.ext4", path="/sbin:/usr/sbin")
        if mkfs is None:
            raise MachineUnavailable("mkfs.ext4 not found: apt-get install e2fsprogs")
        image = workdir / "scratch.img"
        with open(image, "wb") as f:
            f.truncate(self.scratch_mib << 20)
        proc = subprocess.run([mkfs, "-q", "-F", "-b", "4096", str(image)],
                              capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise MachineError(f"mkfs.ext4 of the scratch disk failed: {proc.stderr.strip()}")

    # -- lifecycle ----------------------------------------------------------------

    def start(self) -> dict[str, Any]:
        """Boots the machine and waits for the agent's ready line; returns it.

        Raises :class:`MachineError` (with the console's last lines) when QEMU exits
        or the agent is not ready within ``ready_timeout`` seconds; QEMU is killed
        and the temp dir removed then."""
        if self._res is not None:
            raise MachineError(f"machine {self.spec.name} already started")
        workdir = Path(tempfile.mkdtemp(prefix=f"kvmmem-{self.spec.name}-"))
        res = self._res = _Resources(workdir)
        self._finalizer = weakref.finalize(self, res.cleanup)
        try:
            self._prepare(workdir)
            cmd = self.qemu_command(workdir)
            t0 = time.monotonic()
            with open(workdir / "qemu.err", "wb") as err:
                res.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL,
                                            stdout=subprocess.DEVNULL, stderr=err,
                                            process_group=0, preexec_fn=_pdeathsig)
            deadline = t0 + self.ready_timeout
            res.sock = self._connect(workdir / "agent.sock", deadline)
            while True:
                msg = self._read_message(
                    deadline, f"agent not ready within {self.ready_timeout:g} s")
                if msg.get("event") == "ready":
                    break
            self.boot_seconds = time.monotonic() - t0
            self.ready = msg
            return msg
        except BaseException:
            self._cleanup()
            raise

    def _connect(self, path: Path, deadline: float) -> socket.socket:
        while True:
            self._check_alive("before its socket came up")
            if path.exists():
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                try:
                    sock.connect(str(path))
                    return sock
                except OSError:
                    sock.close()
            if time.monotonic() > deadline:
                self._fail("QEMU's agent socket did not appear")
            time.sleep(0.02)

    def _check_alive(self, when: str) -> None:
        res = self._res
        if res is None or res.proc is None:
            raise MachineError(f"machine {self.spec.name} is not running")
        status = res.proc.poll()
        if status is not None:
            err = ""
            with contextlib.suppress(OSError):
                err = (res.workdir / "qemu.err").read_text(errors="replace").strip()
            detail = f"; qemu: {err.splitlines()[-1]}" if err else ""
            self._fail(f"QEMU exited with status {status} {when}{detail}")

    def _fail(self, message: str) -> None:
        tail = console_tail(self.console_log) if self.console_log else "(no console)"
        self._cleanup()
        raise MachineError(f"{self.spec.name}: {message}; console: {tail}")

    def _read_message(self, deadline: float, what: str) -> dict[str, Any]:
        """Returns the next JSON object from the agent; fails (killing QEMU) at the
        deadline or when QEMU exits."""
        while b"\n" not in self._buffer:
            res = self._res
            if res is None or res.sock is None:
                raise MachineError(f"machine {self.spec.name} is not running")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self._fail(what)
            readable, _, _ = select.select([res.sock], [], [], min(remaining, 0.25))
            if not readable:
                self._check_alive("while waiting for the agent")
                continue
            chunk = res.sock.recv(65536)
            if not chunk:
                time.sleep(0.2)
                self._check_alive("(the agent's port closed)")
                self._fail("the agent's port closed")
            self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        try:
            msg = json.loads(line)
        except ValueError:
            return {}
        return msg if isinstance(msg, dict) else {}

    def request(self, cmd: str, *, timeout: float = DEFAULT_REQUEST_TIMEOUT,
                **fields: Any) -> Any:
        """Sends ``{"id": N, "cmd": cmd, **fields}`` and returns the answer's
        ``result``.

        Raises :class:`AgentError` when the agent answers ``ok: false`` (the machine
        keeps running) and :class:`MachineError` when it does not answer within
        ``timeout`` seconds or QEMU dies (QEMU is killed then, the machine closed)."""
        res = self._res
        if res is None or res.sock is None or self.ready is None:
            raise MachineError(f"machine {self.spec.name} is not running")
        ident = next(self._ids)
        data = (json.dumps({"id": ident, "cmd": cmd, **fields}) + "\n").encode()
        deadline = time.monotonic() + timeout
        res.sock.settimeout(timeout)
        try:
            res.sock.sendall(data)
        except OSError as exc:
            self._fail(f"cannot send {cmd} to the guest: {exc}")
        while True:
            msg = self._read_message(
                deadline, f"guest did not answer {cmd} within {timeout:g} s")
            if msg.get("id") != ident:
                continue
            if msg.get("ok"):
                return msg.get("result")
            raise AgentError(f"{self.spec.name}: {cmd} failed in the guest: "
                             f"{msg.get('error')}", msg.get("detail"))

    def ping(self, timeout: float = 30.0) -> float:
        """Pings the agent; returns the round trip in seconds."""
        t0 = time.monotonic()
        self.request("ping", timeout=timeout)
        return time.monotonic() - t0

    def close(self, timeout: float = 10.0) -> int | None:
        """Asks the agent to shut down, waits up to ``timeout`` s for QEMU to exit,
        kills it otherwise; removes the temp dir.  Returns QEMU's exit status
        (``None`` when it was not running).  Idempotent."""
        res = self._res
        if res is None:
            return None
        status: int | None = None
        try:
            if res.proc is not None and res.proc.poll() is None and res.sock is not None \
                    and self.ready is not None:
                try:
                    res.sock.settimeout(2)
                    res.sock.sendall(b'{"id":0,"cmd":"shutdown"}\n')
                    res.proc.wait(timeout=timeout)
                except (OSError, subprocess.TimeoutExpired):
                    pass
            status = res.kill()
        finally:
            self._cleanup()
        return status

    def _cleanup(self) -> None:
        log = self.console_log
        if log is not None and self._res is not None:
            self._res.kill()
            with contextlib.suppress(OSError), open(log, "rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - 65536))
                self.console_output = _ANSI.sub("", f.read().decode("utf-8", "replace"))
        if self._finalizer is not None:
            self._finalizer()
        self._res = None
        self._buffer = b""

    def __enter__(self) -> Machine:
        if self._res is None:
            self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    # -- interactive shell --------------------------------------------------------

    def shell(self) -> int:
        """Boots with ``kvmmem.shell``: the console on this terminal (``-serial
        mon:stdio``; Ctrl-A X quits QEMU, ``poweroff -f`` in the guest too).
        Returns QEMU's exit status when it ends."""
        workdir = Path(tempfile.mkdtemp(prefix=f"kvmmem-{self.spec.name}-"))
        try:
            self._prepare(workdir)
            proc = subprocess.Popen(self.qemu_command(workdir, shell=True),
                                    preexec_fn=_pdeathsig)
            try:
                return proc.wait()
            except KeyboardInterrupt:
                proc.kill()
                return proc.wait()
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
        finally:
            shutil.rmtree(workdir, ignore_errors=True)


def boot(arch: str, version: str, **options: Any) -> Machine:
    """Returns a started :class:`Machine` (``options`` as for its constructor); raises
    what :meth:`Machine.start` raises."""
    machine = Machine(arch, version, **options)
    machine.start()
    return machine
