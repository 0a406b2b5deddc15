"""``inspect`` and ``verify``: what an image or stream holds, as a stable JSON document.

The schema is documented in docs/inspect.md; ``schema`` names its version.
"""

from __future__ import annotations

from typing import Any

from ._errors import StreamError
from ._usecases import read_all
from .image import FORMAT_IMAGE, VerifyingReader

SCHEMA = "vmtransport-inspect/1"


def describe(uri: str) -> dict[str, Any]:
    """Read all of ``uri`` and describe it (raises only for unreadable input)."""
    return report(uri, read_all(uri))


def report(uri: str, r: VerifyingReader) -> dict[str, Any]:
    p = r.parser
    cfg = p.configuration
    h = r.header
    lv = r.libvirt
    image: dict[str, Any] | None = None
    if h is not None:
        image = {
            "format_version": h.version,
            "state": h.state_name,
            "payload_kind": h.payload_kind_name,
            "payload_offset": h.payload_offset,
            "payload_length": h.payload_length,
            "checksum_algorithm": "xxh3-128",
            "checksum": h.checksum.hex() if h.complete else None,
            "checksum_ok": r.checksum_ok,
            "eof_offset": h.eof_offset if h.complete else None,
            "metadata": h.metadata,
        }
    libvirt: dict[str, Any] | None = None
    if lv is not None:
        libvirt = {
            "version": lv.version,
            "partial": lv.partial,
            "compression": lv.format,
            "was_running": lv.was_running,
            "domain_name": lv.domain_name,
            "data_len": lv.data_len,
            "stream_offset": lv.stream_offset,
        }
    stream_complete = p.complete
    complete = (
        stream_complete
        and not r.problems
        and (h is None or h.complete)
        and (lv is None or not lv.partial)
    )
    return {
        "schema": SCHEMA,
        "uri": uri,
        "format": r.format,
        "complete": complete,
        "problems": list(r.problems),
        "image": image,
        "libvirt": libvirt,
        "stream": {
            "length": r.stream_length,
            "complete": stream_complete,
            "machine_type": cfg.machine_type if cfg else None,
            "runstate": p.runstate,
            "ram_total_bytes": sum(b.used_length for b in p.ram_blocks.values()),
            "ram_blocks": [
                {
                    "name": n,
                    "used_length": b.used_length,
                    "normal_pages": b.normal_pages,
                    "zero_pages": b.zero_pages,
                }
                for n, b in p.ram_blocks.items()
            ],
            "devices": [
                {
                    "idstr": d.idstr,
                    "instance_id": d.instance_id,
                    "version_id": d.version_id,
                    "section_id": d.section_id,
                    "size": d.size,
                }
                for d in r.devices
            ],
            "commands": [
                {"cmd": c.cmd, "name": c.name, "length": len(c.data)} for c in r.commands
            ],
            "vm_description": p.description is not None,
            "eof_offset": p.eof_offset,
        },
    }


def render(d: dict[str, Any]) -> str:
    """The human-readable form of :func:`report`'s document."""
    s = d["stream"]
    lines = [f"{d['uri']}: {d['format']}, {'complete' if d['complete'] else 'NOT complete'}"]
    for problem in d["problems"]:
        lines.append(f"  problem: {problem}")
    if d["image"]:
        i = d["image"]
        ck = {True: "matches", False: "MISMATCH", None: "not checked"}[i["checksum_ok"]]
        lines.append(
            f"  image: format {i['format_version']}, {i['state']}, payload {i['payload_kind']}"
            f" {i['payload_length']} bytes at {i['payload_offset']}, xxh3-128 {ck}"
        )
        for k, v in sorted(i["metadata"].items()):
            if k != "stream":
                lines.append(f"  {k}: {v}")
    if d["libvirt"]:
        lv = d["libvirt"]
        lines.append(
            f"  libvirt: version {lv['version']}, {'PARTIAL' if lv['partial'] else 'complete'}"
            f", {lv['compression']}, domain {lv['domain_name']!r}, "
            f"was {'running' if lv['was_running'] else 'paused'}"
        )
    lines.append(
        f"  stream: {s['length']} bytes, machine {s['machine_type']}, runstate "
        f"{s['runstate']}, VM description {'present' if s['vm_description'] else 'absent'}"
    )
    for b in s["ram_blocks"]:
        lines.append(
            f"  ram {b['name']}: {b['used_length']} bytes, {b['normal_pages']} normal pages, "
            f"{b['zero_pages']} zero pages"
        )
    for dev in s["devices"]:
        lines.append(
            f"  device {dev['idstr']} instance {dev['instance_id']} version "
            f"{dev['version_id']}: {dev['size']} bytes"
        )
    for c in s["commands"]:
        lines.append(f"  command {c['name']} ({c['cmd']}), {c['length']} bytes")
    return "\n".join(lines)


def verify(uri: str) -> dict[str, Any]:
    """Raise StreamError with the reason unless ``uri`` is a complete vmtransport image
    whose checksum matches; return its description otherwise."""
    d = describe(uri)
    if d["problems"]:
        raise StreamError(d["problems"][0])
    if d["format"] != FORMAT_IMAGE:
        raise StreamError(
            f"{uri}: a {d['format']} has no checksum to verify (stream "
            f"{'complete' if d['stream']['complete'] else 'incomplete'})"
        )
    if not d["complete"] or not d["image"]["checksum_ok"]:
        raise StreamError(f"{uri}: the image is not complete")
    return d
