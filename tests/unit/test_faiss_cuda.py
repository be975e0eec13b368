"""benchmarks/faiss_cuda.py, which makes faiss's GPU wheel fit the GPU check and run on a CUDA 13
machine: the ELF edits are checked on small libraries built here with gcc (no CUDA needed)."""

import base64
import hashlib
import shutil
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # benchmarks/ is not installed; `python -m pytest` from the root has it
    sys.path.insert(0, str(ROOT))

from benchmarks.faiss_cuda import (  # noqa: E402
    FATBIN_MAGIC,
    elf_hash,
    library_names,
    rename_needed,
    repack_wheel,
    section_named,
    trim_fatbins,
)

needs_gcc = pytest.mark.skipif(shutil.which("gcc") is None, reason="needs gcc to build the test libraries")


def gcc(tmp: Path, name: str, source: str, *args: str) -> Path:
    src = tmp / (name + ".c")
    src.write_text(source)
    out = tmp / name
    subprocess.run(["gcc", "-shared", "-fPIC", "-o", str(out), str(src), *args], check=True, cwd=tmp)
    return out


def test_elf_hash_equals_the_hashes_the_linker_stored():
    data = Path(sys.executable).resolve().read_bytes()
    versions = [(name, struct.unpack_from("<I", data, at)[0]) for _, name, at in library_names(data) if at is not None]
    assert versions, "the Python executable asks no symbol versions of its libraries"
    assert all(elf_hash(name.encode()) == stored for name, stored in versions)
    assert elf_hash(b"GLIBC_2.2.5") == 0x09691A75


@needs_gcc
def test_renamed_library_binds_to_the_new_soname_and_its_versions(tmp_path):
    # libdemo.so.1 and libdemo.so.2 version their symbol by soname, as CUDA does (demo@libdemo.so.1);
    # a library linked against .1, renamed to .2, must load beside .2 alone and call .2's demo().
    for v in (1, 2):
        (tmp_path / f"v{v}.map").write_text(f"libdemo.so.{v} {{ global: demo; local: *; }};\n")
        gcc(tmp_path, f"libdemo.so.{v}", f"int demo(void) {{ return {v}; }}\n",
            f"-Wl,-soname,libdemo.so.{v}", f"-Wl,--version-script,v{v}.map")
    (tmp_path / "libdemo.so").symlink_to("libdemo.so.1")
    user = gcc(tmp_path, "libuser.so", "int demo(void);\nint user(void) { return 10 + demo(); }\n",
               "-L.", "-ldemo")
    load = ("import ctypes, sys; ctypes.CDLL(sys.argv[1], mode=ctypes.RTLD_GLOBAL); "
            "print(ctypes.CDLL(sys.argv[2]).user())")

    def call_with_v2() -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-c", load, str(tmp_path / "libdemo.so.2"), str(user)],
                              capture_output=True, text=True)

    assert call_with_v2().returncode != 0  # before: it asks for libdemo.so.1
    done = rename_needed(user, {"libdemo.so.1": "libdemo.so.2"})
    assert "libdemo.so.1 -> libdemo.so.2 (version)" in done and "libdemo.so.1 -> libdemo.so.2" in done
    after = call_with_v2()
    assert after.returncode == 0, after.stderr
    assert after.stdout.strip() == "12"
    assert rename_needed(user, {"libdemo.so.1": "libdemo.so.2"}) == []  # already done: nothing to do


def test_rename_keeps_the_length():
    with pytest.raises(ValueError, match="keeps the length"):
        rename_needed(Path("unused"), {"libcublas.so.12": "libcublas.so.130"})


def fatbin(entries: list[tuple[int, int, bytes]]) -> bytes:
    """A fat binary as nvcc lays it out: a 16-byte header, then (kind, arch, payload) entries,
    each a 64-byte header with the arch at byte 28 and its payload padded to 8 bytes."""
    body = b""
    for kind, arch, payload in entries:
        padded = payload + bytes(-len(payload) % 8)
        head = bytearray(64)
        struct.pack_into("<HHIQ", head, 0, kind, 0x101, 64, len(padded))
        struct.pack_into("<I", head, 20, len(payload))
        struct.pack_into("<I", head, 28, arch)
        body += bytes(head) + padded
    return struct.pack("<IHHQ", FATBIN_MAGIC, 1, 16, len(body)) + body


@needs_gcc
def test_trim_keeps_each_fatbins_sm90_code_where_it_starts(tmp_path):
    first = fatbin([(2, 80, b"A" * 24), (1, 90, b"P" * 16), (2, 90, b"B" * 40)])
    second = fatbin([(2, 70, b"C" * 8), (2, 80, b"D" * 8)])  # no sm_90 code: left whole
    blob = first + second
    lib = gcc(tmp_path, "libfat.so",
              '__attribute__((section(".nv_fatbin"), aligned(8), used)) const unsigned char fb[] = {'
              + ",".join(str(b) for b in blob) + "};\n")
    stats = trim_fatbins(lib, 90)
    assert stats["fatbins"] == 2 and stats["left_whole"] == 1 and stats["entries_dropped"] == 2
    data = lib.read_bytes()
    sec = section_named(data, ".nv_fatbin")
    got = data[sec[4]:sec[4] + len(blob)]
    kept = fatbin([(2, 90, b"B" * 40)])
    assert got[:len(kept)] == kept  # the header now counts only the sm_90 entry, which follows it
    assert got[len(kept):len(first)] == bytes(len(first) - len(kept))  # the rest zeroed
    assert got[len(first):] == second  # the second fat binary untouched, where it was


def test_repack_wheel_drops_edits_and_rewrites_record(tmp_path):
    src = tmp_path / "demo-1.0-py3-none-any.whl"
    with zipfile.ZipFile(src, "w") as z:
        z.writestr("demo/__init__.py", "x = 1\n")
        z.writestr("demo/big.so", b"\0" * 100)
        z.writestr("demo-1.0.dist-info/WHEEL", "Wheel-Version: 1.0\nTag: py3-none-any\n")
        z.writestr("demo-1.0.dist-info/RECORD", "stale\n")

    def edit(name, path):
        if name == "demo/__init__.py":
            path.write_text("x = 2\n")
            return True
        return False

    out = repack_wheel(src, tmp_path / "out", "1trim", drop=lambda n: n.endswith(".so"), edit=edit)
    assert out.name == "demo-1.0-1trim-py3-none-any.whl"
    with zipfile.ZipFile(out) as z:
        names = set(z.namelist())
        assert "demo/big.so" not in names
        assert z.read("demo/__init__.py") == b"x = 2\n"
        assert z.read("demo-1.0.dist-info/WHEEL").decode().endswith("Build: 1trim\n")
        rows = [r.split(",") for r in z.read("demo-1.0.dist-info/RECORD").decode().splitlines()]
        for name, digest, size in rows:
            if name.endswith("RECORD"):
                assert digest == size == ""
                continue
            blob = z.read(name)
            assert digest == "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(blob).digest()).rstrip(b"=").decode()
            assert int(size) == len(blob)
        assert {r[0] for r in rows} == names
