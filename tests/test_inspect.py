"""``vmtransport inspect`` and ``verify`` against fresh saves of real QEMU 7.2 and 10.0 VMs.

What inspect reports is checked against what QEMU itself says (HMP ``info ramblock``,
``query-memdev``, ``query-machines``) and against the VM description QEMU appended to
its own stream (parsed here by hand); the JSON keys against docs/inspect.md, so that the
schema cannot drift from its documentation silently.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
from helpers import (
    HEADER_SIZE,
    VMT,
    Saved,
    damage,
    description_at_end,
    load_stream,
    one_error_line,
)

from vmtransport.image._libvirt import build_libvirt_header

DOC = Path(__file__).parent.parent / "docs" / "inspect.md"
SCHEMA_KEYS = {"schema", "uri", "format", "complete", "problems", "image", "libvirt", "stream"}
IMAGE_KEYS = {
    "format_version", "state", "payload_kind", "payload_offset", "payload_length",
    "checksum_algorithm", "checksum", "checksum_ok", "eof_offset", "metadata",
}  # fmt: skip
LIBVIRT_KEYS = {
    "version", "partial", "compression", "was_running", "domain_name", "data_len",
    "stream_offset",
}  # fmt: skip
STREAM_KEYS = {
    "length", "complete", "machine_type", "runstate", "ram_total_bytes", "ram_blocks",
    "devices", "commands", "vm_description", "eof_offset",
}  # fmt: skip
RAM_BLOCK_KEYS = {"name", "used_length", "normal_pages", "zero_pages"}
DEVICE_KEYS = {"idstr", "instance_id", "version_id", "section_id", "size"}
COMMAND_KEYS = {"cmd", "name", "length"}
XML = "<domain type='kvm'><name>web1</name><memory unit='KiB'>65536</memory></domain>"


def run(*args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([str(VMT), *args], capture_output=True, timeout=120, check=False)


def inspect_json(target: str) -> dict[str, Any]:
    r = run("inspect", "--json", target)
    assert r.returncode == 0, r.stderr
    assert r.stderr == b""
    doc = json.loads(r.stdout)
    assert isinstance(doc, dict)
    return doc


# --- the documented schema ------------------------------------------------------------


def documented_keys() -> dict[str, set[str]]:
    """The keys docs/inspect.md lists, per object."""
    text = DOC.read_text()

    def table_rows(after: str) -> dict[str, str]:
        section = text[text.index(after) :]
        rows: dict[str, str] = {}
        started = False
        for line in section.splitlines()[1:]:
            m = re.match(r"\|\s*`(\w+)`\s*\|[^|]*\|(.*)\|\s*$", line)
            if m:
                rows[m.group(1)] = m.group(2)
                started = True
            elif started and not line.startswith("|"):
                break
        return rows

    def names(fragment: str) -> set[str]:
        """Backquoted lower-case identifiers: field names (values and examples are quoted
        or upper case)."""
        return set(re.findall(r"`([a-z_]+)`", fragment))

    def paragraph(head: str) -> str:
        start = text.index(f"\n`{head}`: ") + len(head) + 4
        return text[start : text.index("\n\n", start)]

    top = table_rows("## `--json` schema")
    stream = table_rows("`stream`:\n")
    return {
        "top": set(top),
        "image": names(paragraph("image")),
        "libvirt": names(paragraph("libvirt")),
        "stream": set(stream),
        "ram_blocks": names(stream["ram_blocks"]),
        "devices": names(stream["devices"]),
        "commands": names(stream["commands"]),
    }


def test_documented_schema_is_the_tested_one() -> None:
    doc = documented_keys()
    assert doc == {
        "top": SCHEMA_KEYS,
        "image": IMAGE_KEYS,
        "libvirt": LIBVIRT_KEYS,
        "stream": STREAM_KEYS,
        "ram_blocks": RAM_BLOCK_KEYS,
        "devices": DEVICE_KEYS,
        "commands": COMMAND_KEYS,
    }


def check_schema(doc: dict[str, Any]) -> None:
    """Exactly the documented keys, with the documented types."""
    assert set(doc) == SCHEMA_KEYS
    assert doc["schema"] == "vmtransport-inspect/1"
    assert doc["format"] in ("vmtransport-image", "qemu-stream", "libvirt-save-image")
    assert isinstance(doc["complete"], bool) and isinstance(doc["problems"], list)
    if doc["image"] is not None:
        assert set(doc["image"]) == IMAGE_KEYS
    if doc["libvirt"] is not None:
        assert set(doc["libvirt"]) == LIBVIRT_KEYS
    s = doc["stream"]
    assert set(s) == STREAM_KEYS
    for b in s["ram_blocks"]:
        assert set(b) == RAM_BLOCK_KEYS
    for d in s["devices"]:
        assert set(d) == DEVICE_KEYS
    for c in s["commands"]:
        assert set(c) == COMMAND_KEYS


# --- inspect ---------------------------------------------------------------------------


def test_inspect_json_matches_what_qemu_says(saved: Saved, tmp_path: Path) -> None:
    doc = inspect_json(str(saved.image))
    check_schema(doc)
    assert doc["uri"] == f"file:{saved.image}"
    assert doc["format"] == "vmtransport-image"
    assert doc["complete"] is True and doc["problems"] == []
    img = doc["image"]
    assert img["state"] == "complete" and img["checksum_ok"] is True
    assert img["payload_offset"] == HEADER_SIZE
    assert img["payload_length"] == saved.image.stat().st_size - HEADER_SIZE
    assert img["metadata"]["name"] == "web1"
    s = doc["stream"]
    assert s["complete"] is True and s["vm_description"] is True
    assert s["length"] == img["payload_length"]
    assert s["machine_type"] == saved.machine == f"pc-i440fx-{saved.version}"
    assert s["runstate"] == "prelaunch"

    # RAM blocks: what QEMU's `info ramblock` lists, in QEMU's order of the stream.
    blocks = {b["name"]: b for b in s["ram_blocks"]}
    assert {n: b["used_length"] for n, b in blocks.items()} == saved.ramblocks
    assert s["ram_total_bytes"] == sum(saved.ramblocks.values())
    main = blocks[saved.main_block]
    assert main["used_length"] == saved.memdev_size
    assert main["normal_pages"] + main["zero_pages"] >= main["used_length"] // 4096
    assert main["normal_pages"] >= main["used_length"] // 4096 * 99 // 100  # random RAM

    # Devices: the VM description QEMU wrote at the end of its stream, parsed by hand
    # from the restored bytes.
    restored = tmp_path / "stream"
    with open(restored, "wb") as f:
        r = subprocess.run([VMT, "restore", f"file:{saved.image}"], stdout=f,
                           stderr=subprocess.PIPE, timeout=60, check=False)  # fmt: skip
    assert r.returncode == 0, r.stderr
    stream = restored.read_bytes()
    eof, desc = description_at_end(stream)
    assert s["eof_offset"] == img["eof_offset"] == eof
    listed = [(d["name"], d["instance_id"]) for d in desc["devices"]]
    assert [(d["idstr"], d["instance_id"]) for d in s["devices"]] == listed
    assert "globalstate" in {d["idstr"] for d in s["devices"]}
    assert all(d["size"] >= 0 for d in s["devices"])

    # Commands: QEMU 10.0 announces the switchover; 7.2 predates it.
    names = [c["name"] for c in s["commands"]]
    if saved.version == "10.0":
        assert {"cmd": 11, "name": "SWITCHOVER_START", "length": 0} in s["commands"]
    else:
        assert "SWITCHOVER_START" not in names


def test_inspect_human_form(saved: Saved) -> None:
    r = run("inspect", str(saved.image))
    assert r.returncode == 0 and r.stderr == b""
    text = r.stdout.decode()
    assert text.splitlines()[0] == f"file:{saved.image}: vmtransport-image, complete"
    assert f"machine {saved.machine}" in text
    assert "runstate prelaunch" in text
    assert "name: web1" in text
    for name, used in saved.ramblocks.items():
        assert re.search(rf"^  ram {re.escape(name)}: {used} bytes, ", text, re.M), name
    assert "xxh3-128 matches" in text


def test_inspect_raw_and_libvirt_forms(tmp_path: Path) -> None:
    """The other two formats, on a real stream: their own objects, the same stream."""
    stream, meta = load_stream("qemu10.0-q35")
    raw = tmp_path / "vm.raw"
    raw.write_bytes(stream)
    lv = tmp_path / "vm.lv"
    lv.write_bytes(build_libvirt_header(XML, was_running=True) + stream)
    docs = {"raw": inspect_json(str(raw)), "libvirt": inspect_json(str(lv))}
    for doc in docs.values():
        check_schema(doc)
        assert doc["complete"] is True
        assert doc["stream"]["machine_type"] == meta["machine_type"]
        assert doc["stream"]["length"] == len(stream)
        assert doc["image"] is None
    assert docs["raw"]["format"] == "qemu-stream" and docs["raw"]["libvirt"] is None
    assert docs["libvirt"]["format"] == "libvirt-save-image"
    assert docs["libvirt"]["libvirt"]["domain_name"] == "web1"
    assert docs["libvirt"]["libvirt"]["stream_offset"] == len(lv.read_bytes()) - len(stream)
    assert docs["raw"]["stream"] == docs["libvirt"]["stream"]


# --- verify ----------------------------------------------------------------------------


def test_verify_good_image(saved: Saved) -> None:
    r = run("verify", str(saved.image))
    assert r.returncode == 0, r.stderr
    assert r.stderr == b""
    assert "OK" in r.stdout.decode() and "checksum matches" in r.stdout.decode()


VERIFY_FAILURES = {
    "flipped-byte": "checksum mismatch",
    "truncated": "truncated",
    "partial": "partial",
    "raw-stream": "qemu-stream has no checksum",
    "libvirt-image": "libvirt-save-image has no checksum",
}


def make_bad(saved: Saved, how: str, path: Path) -> None:
    if how == "raw-stream":
        path.write_bytes(saved.cat.read_bytes())
    elif how == "libvirt-image":
        path.write_bytes(build_libvirt_header(XML, was_running=False) + saved.cat.read_bytes())
    else:
        damage(saved, {"flipped-byte": "payload-flip", "truncated": "truncated-tail",
                       "partial": "partial"}[how], path)  # fmt: skip


BAD = {
    "flipped-byte": "image: a byte of the guest's RAM flipped mid-payload",
    "truncated": "image truncated inside the VM description (after QEMU's EOF marker)",
    "partial": "image marked partial (header state 0, CRC right)",
    "raw-stream": "a raw stream given to verify",
    "libvirt-image": "a libvirt image given to verify",
}


@pytest.mark.parametrize(
    "how",
    [
        pytest.param(how, marks=pytest.mark.fault(
            BAD[how], direction="inspect/verify", vm="n/a", disk="n/a",
            exit="verify 1, nothing on stdout; inspect --json 0" + (
                ", complete true (no image)" if how in ("raw-stream", "libvirt-image")
                else ", complete false"
            ),
            message=f"'{expected}'",
        ))
        for how, expected in VERIFY_FAILURES.items()
    ],
)  # fmt: skip
def test_verify_refuses(saved: Saved, tmp_path: Path, how: str) -> None:
    bad = tmp_path / "bad"
    make_bad(saved, how, bad)
    r = run("verify", str(bad))
    assert r.returncode == 1
    line = one_error_line(r.stderr)
    assert VERIFY_FAILURES[how] in line, line
    assert r.stdout == b""
    # inspect still describes it, and says what is wrong with an image.
    doc = inspect_json(str(bad))
    check_schema(doc)
    if how in ("raw-stream", "libvirt-image"):
        assert doc["complete"] is True and doc["image"] is None
    else:
        assert doc["complete"] is False
        assert any(VERIFY_FAILURES[how] in p for p in doc["problems"]), doc["problems"]
        if how == "flipped-byte":
            assert doc["image"]["checksum_ok"] is False
        elif how == "truncated":
            assert doc["image"]["checksum_ok"] is None
        else:
            assert doc["image"]["state"] == "partial" and doc["image"]["checksum"] is None
