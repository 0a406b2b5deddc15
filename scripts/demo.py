#!/usr/bin/env python3
"""The main job on a built-in default: save a real VM through odirect: and restore it.

    .venv/bin/python scripts/demo.py [--mem-mib 512] [--qemu 10.0] [--dir DIR]

Starts QEMU (KVM when usable, else TCG) with its RAM in a shared file of random bytes,
saves it with ``migrate "exec:vmtransport save odirect:IMAGE"``, restores it into a
second QEMU started with ``-incoming "exec:vmtransport restore odirect:IMAGE"`` over
zeroed RAM, and checks that the two RAM files are equal byte for byte.
"""

from __future__ import annotations

import argparse
import shlex
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from qemuvm import (
    VM,
    describe_difference,
    files_equal,
    find_qemus,
    kvm_usable,
    make_ram_file,
    qemu_version,
)

from vmtransport.testing import cached_bytes

VMT = Path(sys.executable).parent / "vmtransport"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mem-mib", type=int, default=512)
    p.add_argument("--qemu", help="QEMU version to use (default: the newest found)")
    p.add_argument("--dir", default="/var/tmp/vmtransport-demo",
                   help="where the image is written")  # fmt: skip
    args = p.parse_args()
    qemus = find_qemus()
    if not qemus:
        print("demo: no QEMU found; run scripts/setup.sh", file=sys.stderr)
        return 1
    version = args.qemu or max(qemus, key=lambda v: tuple(map(int, v.split("."))))
    qemu = qemus[version]
    work = Path(args.dir)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    ram_dir = Path("/dev/shm") if Path("/dev/shm").is_dir() else work
    src_ram, dst_ram = ram_dir / "vmtdemo-src.ram", ram_dir / "vmtdemo-dst.ram"
    image = work / "vm.sav"
    mib = args.mem_mib
    print(f"QEMU {qemu_version(qemu)} ({'kvm' if kvm_usable() else 'tcg'}), "
          f"{mib} MiB of random guest RAM")  # fmt: skip
    try:
        make_ram_file(src_ram, mib, random=True)
        make_ram_file(dst_ram, mib, random=False)

        save_uri = f"exec:{VMT} save {shlex.quote(f'odirect:{image}')}"
        print(f'save:    migrate "{save_uri}"')
        with VM(qemu, work, name="src", mem_mib=mib, ram_file=src_ram, paused=True) as vm:
            vm.migrate(save_uri)
            info = vm.wait_migration(timeout=600, poll=0.01)
            if info["status"] != "completed":
                print(f"demo: save {info['status']}: {info.get('error-desc', '')}")
                return 1
            time.sleep(0.02)
            secs = vm.query_migrate().get("total-time", 0) / 1000 or 1e-9
        size = image.stat().st_size
        cached, _ = cached_bytes(image)
        print(f"         {size / 2**20:.1f} MiB in {secs:.2f} s = {size / 2**20 / secs:.0f} MiB/s"
              f" (QEMU's total-time); page cache holds {cached / size:.1%} of the image")

        restore_uri = f"exec:{VMT} restore {shlex.quote(f'odirect:{image}')}"
        print(f'restore: -incoming "{restore_uri}"')
        with VM(qemu, work, name="dst", mem_mib=mib, ram_file=dst_ram,
                incoming="defer") as vm:  # fmt: skip
            start = time.monotonic()
            vm.cmd("migrate-incoming", {"uri": restore_uri})
            status = vm.wait_incoming(timeout=600, poll=0.005)
            secs = time.monotonic() - start
        cached, _ = cached_bytes(image)
        print(f"         {size / 2**20:.1f} MiB in {secs:.2f} s = {size / 2**20 / secs:.0f} MiB/s;"
              f" destination is {status}; page cache holds {cached / size:.1%} of the image")

        if not files_equal(src_ram, dst_ram):
            print(f"verify:  FAILED: {describe_difference(src_ram, dst_ram)}")
            return 1
        print(f"verify:  the restored guest RAM equals the original, byte for byte ({mib} MiB)")
        return 0
    finally:
        src_ram.unlink(missing_ok=True)
        dst_ram.unlink(missing_ok=True)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
