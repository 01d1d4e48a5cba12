"""The agent: the stdlib-only program that runs inside an emulated machine.

``python3 -m kvmmem.realkvm.agent PORT`` opens ``PORT`` (the virtio-serial
port ``/dev/virtio-ports/kvmmem``; any file or character device that reads
and writes lines works), announces itself with one line and then answers one
request per line, in order.  Every line is one JSON object.

Agent to host, once at start::

    {"event": "ready", "release": UNAME_R, "machine": UNAME_M, "python": "3.13.5",
     "kvm": null | "why /dev/kvm cannot be used"}

Host to agent, then agent to host::

    {"id": N, "cmd": "ping"}                   -> {"id": N, "ok": true, "result": "pong"}
    {"id": N, "cmd": "probe"}                  -> {"id": N, "ok": true, "result": {...}}
    {"id": N, "cmd": "run", "program": {...}}  -> {"id": N, "ok": true, "result": RUN}
    {"id": N, "cmd": "shutdown"}               -> {"id": N, "ok": true}, then power off

A request that fails answers ``{"id": N, "ok": false, "error": TEXT}``; the
agent keeps serving.  ``run`` takes a program of
:mod:`kvmmem.realkvm.program` and answers its :class:`RealRun` as a dict.

Everything this module imports, directly or not, is the standard library or
``kvmmem.realkvm``'s stdlib-only modules: the guest has a bare Python and the
package read over 9p (``tests/realkvm/test_agent.py`` checks the import
closure).
"""

from __future__ import annotations

import json
import os
import platform
import sys
import traceback
from collections.abc import Callable
from typing import IO, Any

Request = dict[str, Any]


SCRATCH = "/mnt/scratch"
"""Where the machine's init mounts its ext4 scratch disk (``file`` mappings)."""
IVSHMEM_IDS = ("0x1af4", "0x1110")
"""PCI vendor and device id of QEMU's ivshmem-plain: its BAR 2 is the ``device`` source."""
VFIO_PARAMETER = "kvmmem.vfio="
"""The kernel command-line word naming the PCI device for ``vfio-bar`` mappings."""
VFIO_MODULE_DIR = "/lib/modules/vfio"
"""Where the machine's initramfs holds the vfio modules and their ``load`` list."""


def vfio_device(cmdline: str = "/proc/cmdline") -> str | None:
    """The PCI device the machine set aside for ``vfio-bar`` (``kvmmem.vfio=BDF`` on
    the kernel command line), or None."""
    try:
        with open(cmdline) as f:
            words = f.read().split()
    except OSError:
        return None
    return next((w[len(VFIO_PARAMETER):] for w in words if w.startswith(VFIO_PARAMETER)),
                None)


def environment() -> dict[str, str | None]:
    """Where this machine's ``file``, ``device`` and ``vfio-bar`` mappings come from:
    ``{"file_dir": the scratch mount or None, "device_bar": ivshmem's resource2 or
    None, "vfio_bar": the PCI device for vfio or None, "vfio_modules": the directory of
    the vfio modules or None}``."""
    file_dir = None
    try:
        with open("/proc/self/mounts") as f:
            if any(line.split()[1] == SCRATCH for line in f):
                file_dir = SCRATCH
    except OSError:
        pass
    device_bar = None
    base = "/sys/bus/pci/devices"
    for dev in sorted(os.listdir(base)) if os.path.isdir(base) else ():
        try:
            with open(f"{base}/{dev}/vendor") as v, open(f"{base}/{dev}/device") as d:
                ids = (v.read().strip(), d.read().strip())
        except OSError:
            continue
        if ids == IVSHMEM_IDS and os.path.exists(f"{base}/{dev}/resource2"):
            device_bar = f"{base}/{dev}/resource2"
            break
    vfio_bar = vfio_device()
    vfio_modules = VFIO_MODULE_DIR if os.path.exists(f"{VFIO_MODULE_DIR}/load") else None
    return {"file_dir": file_dir, "device_bar": device_bar, "vfio_bar": vfio_bar,
            "vfio_modules": vfio_modules}


def _probe(request: Request) -> Any:
    from kvmmem.realkvm.kvm import probe_kvm
    from kvmmem.realkvm.program import probe
    return {"kvm": probe_kvm(), **probe(**environment())}


def _run(request: Request) -> Any:
    from kvmmem.realkvm.program import run_program
    env = environment()
    return run_program(request["program"], file_dir=env["file_dir"],
                       device_bar=env["device_bar"], vfio_bar=env["vfio_bar"],
                       vfio_modules=env["vfio_modules"]).as_dict()


def _ping(request: Request) -> Any:
    return "pong"


HANDLERS: dict[str, Callable[[Request], Any]] = {
    "ping": _ping,
    "probe": _probe,
    "run": _run,
}


def serve(port: IO[str], out: IO[str]) -> None:
    """Announce readiness on ``out`` and answer requests read from ``port`` until it
    ends or a ``shutdown`` request comes; returns after answering ``shutdown``."""
    from kvmmem.realkvm.kvm import probe_kvm
    uname = os.uname()
    _send(out, {"event": "ready", "release": uname.release, "machine": uname.machine,
                "python": platform.python_version(), "kvm": probe_kvm()})
    for line in port:
        line = line.strip()
        if not line:
            continue
        try:
            request = json.loads(line)
            ident = request.get("id")
            cmd = request.get("cmd")
        except (ValueError, AttributeError) as exc:
            _send(out, {"id": None, "ok": False, "error": f"bad request line: {exc}"})
            continue
        if cmd == "shutdown":
            _send(out, {"id": ident, "ok": True})
            return
        handler = HANDLERS.get(cmd)
        if handler is None:
            _send(out, {"id": ident, "ok": False, "error": f"unknown command {cmd!r}"})
            continue
        try:
            result = handler(request)
        except Exception as exc:  # the agent must outlive any one request
            detail = "".join(traceback.format_exception(exc)[-3:])
            _send(out, {"id": ident, "ok": False,
                        "error": f"{type(exc).__name__}: {exc}", "detail": detail})
            continue
        _send(out, {"id": ident, "ok": True, "result": result})


def _send(out: IO[str], message: dict[str, Any]) -> None:
    out.write(json.dumps(message, separators=(",", ":")) + "\n")
    out.flush()


def main(argv: list[str] | None = None) -> int:
    """Serve on the port named by the first argument (standard input/output when
    none); power the machine off after ``shutdown`` when running as its init's child
    with ``--poweroff``."""
    args = list(sys.argv[1:] if argv is None else argv)
    poweroff = "--poweroff" in args
    args = [a for a in args if a != "--poweroff"]
    if args:
        # A character device cannot be opened "r+" in text mode (not seekable): one
        # reader and one writer on the same port.
        with open(args[0], encoding="utf-8") as port_in, \
                open(args[0], "w", buffering=1, encoding="utf-8") as port_out:
            serve(port_in, port_out)
    else:
        serve(sys.stdin, sys.stdout)
    if poweroff:
        _poweroff()
    return 0


def _poweroff() -> None:
    """``reboot(LINUX_REBOOT_CMD_POWER_OFF)``: QEMU exits (``-no-reboot``)."""
    import ctypes
    os.sync()
    libc = ctypes.CDLL(None, use_errno=True)
    libc.reboot(0x4321FEDC)


if __name__ == "__main__":
    raise SystemExit(main())
