"""faiss's GPU build on the lent H200, for the GPU check (``benchmarks.gpu_check``).

Two obstacles, both met here rather than by carrying more:

- Size. Every faiss wheel with Hopper (sm_90) code is 81-135 MB (faiss-gpu 1.15.1: 135 MB, its
  ``libfaiss.so`` holding each kernel for sm_70, 75, 80, 86, 89 and 90 plus sm_90 PTX), over the
  60 MB that travels; faiss-gpu-cu12 (48 MB) has sm_70 and sm_80 code only, which an sm_90 GPU
  cannot run. :func:`trim_fatbins` keeps the sm_90 machine code of every fat binary in
  ``.nv_fatbin`` and zeroes the rest (which then compresses to nothing): faiss-gpu shrinks to
  about 30 MB, for Hopper GPUs only. :func:`repack_wheel` writes the result as a wheel with a
  build tag (scripts/gpu_wheels.sh, here).
- CUDA 13. The H200's image has CUDA 13 only (torch 2.11+cu130, cuBLAS 13 in ``nvidia/cu13/lib``;
  ``/work/.library/device/KINDS.md``), and faiss's GPU wheels need ``libcudart.so.12`` (a 3.5 MB
  wheel, carried) and ``libcublas.so.12`` (a 400 MB wheel, not carried). The eight cuBLAS functions
  faiss calls (``cublasCreate_v2``, ``cublasGemmEx``, ``cublasSgemmEx``, ...) keep their signatures
  in cuBLAS 13, so :func:`rename_needed` points ``libfaiss`` at ``libcublas.so.13``: the names in
  ``.dynstr`` are rewritten in place (same length) and the hash of each version name in
  ``.gnu.version_r`` with them, because CUDA versions its symbols by soname
  (``cublasGemmEx@libcublas.so.12``) and the loader checks that name and its hash. :func:`prepare`
  tries faiss as installed first and patches the installed copy only when that fails (there).
"""

from __future__ import annotations

import base64
import glob
import hashlib
import json
import os
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

CUBLAS_12_TO_13 = {"libcublas.so.12": "libcublas.so.13", "libcublasLt.so.12": "libcublasLt.so.13"}
SHT_DYNAMIC, SHT_GNU_VERNEED, DT_NEEDED = 6, 0x6FFFFFFE, 1
FATBIN_MAGIC, FATBIN_ELF = 0xBA55ED50, 2
PRELOAD_MARKER = "_gpu_build.py"  # faiss-gpu pre-loads the nvidia-*-cu12 wheels' libraries when this is there
PROBE = ("import json, faiss; print(json.dumps({'faiss': faiss.__version__, "
         "'gpus': int(getattr(faiss, 'get_num_gpus', lambda: 0)())}))")


def elf_hash(name: bytes) -> int:
    """The SysV ELF hash of a name (what ``vna_hash`` holds for a version name)."""
    h = 0
    for c in name:
        h = ((h << 4) + c) & 0xFFFFFFFF
        g = h & 0xF0000000
        if g:
            h ^= g >> 24
        h &= ~g & 0xFFFFFFFF
    return h


def sections(data) -> tuple[list[tuple], int]:
    """The section headers of an ELF64 little-endian file (``(name, type, flags, addr, offset,
    size, link, info, align, entsize)`` each) and the index of the section-name table."""
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        raise ValueError("not a little-endian ELF64 file")
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)
    return [struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * shentsize) for i in range(shnum)], shstrndx


def section_named(data, name: str) -> tuple | None:
    secs, names = sections(data)
    base = secs[names][4]
    for s in secs:
        if bytes(data[base + s[0]:data.index(0, base + s[0])]) == name.encode():
            return s
    return None


def trim_fatbins(path: Path, keep_arch: int = 90) -> dict:
    """Keep, in place, only the ELF (machine code) entries for sm_``keep_arch`` of every fat binary
    in the ``.nv_fatbin`` section of a shared object, and zero the bytes freed. Each fat binary
    stays where it starts (the host code registers it by address) with its size field shrunk; one
    with no such entry is left whole. Returns counts and bytes kept. The result runs only on GPUs
    of that architecture."""
    data = bytearray(Path(path).read_bytes())
    sec = section_named(data, ".nv_fatbin")
    if sec is None:
        raise ValueError(f"{path} has no .nv_fatbin section")
    start, end = sec[4], sec[4] + sec[5]
    stats = {"fatbins": 0, "left_whole": 0, "entries_dropped": 0, "bytes_before": sec[5], "bytes_kept": 0}
    pos = start
    while pos + 16 <= end:
        magic, _, hsz, fatsz = struct.unpack_from("<IHHQ", data, pos)
        if magic != FATBIN_MAGIC:  # padding between fat binaries
            pos += 8
            continue
        stats["fatbins"] += 1
        keep, dropped, e = [], 0, pos + hsz
        while e < pos + hsz + fatsz:
            kind, _, ehsz, padded = struct.unpack_from("<HHIQ", data, e)
            arch, = struct.unpack_from("<I", data, e + 28)
            if kind == FATBIN_ELF and arch == keep_arch:
                keep.append(bytes(data[e:e + ehsz + padded]))
            else:
                dropped += 1
            e += ehsz + padded
        if keep:
            stats["entries_dropped"] += dropped
            body = b"".join(keep)
            struct.pack_into("<Q", data, pos + 8, len(body))
            data[pos + hsz:pos + hsz + fatsz] = body + bytes(fatsz - len(body))
            stats["bytes_kept"] += hsz + len(body)
        else:
            stats["left_whole"] += 1
            stats["bytes_kept"] += hsz + fatsz
        pos += hsz + fatsz
    Path(path).write_bytes(bytes(data))
    return stats


def repack_wheel(src: Path, dest: Path, build_tag: str, *, drop=lambda name: False, edit=None) -> Path:
    """A copy of the wheel ``src`` in folder ``dest``, with a build tag (``NAME-VER-TAG-...whl``),
    without the members ``drop(name)`` is true of, and each member ``edit(name, path)`` changes
    in a scratch file (it returns True when it did); ``RECORD`` is rewritten to match."""
    import tempfile

    parts = src.name[:-4].split("-")
    name, version, tags = parts[0], parts[1], parts[-3:]
    Path(dest).mkdir(parents=True, exist_ok=True)
    out = Path(dest) / f"{name}-{version}-{build_tag}-{'-'.join(tags)}.whl"
    record_name = f"{name}-{version}.dist-info/RECORD"
    rows = []
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as zout, \
            tempfile.TemporaryDirectory() as tmp:
        for info in zin.infolist():
            if info.filename == record_name or drop(info.filename):
                continue
            blob = zin.read(info)
            if edit is not None:
                scratch = Path(tmp) / "member"
                scratch.write_bytes(blob)
                if edit(info.filename, scratch):
                    blob = scratch.read_bytes()
            if info.filename.endswith(".dist-info/WHEEL"):
                blob = blob.rstrip(b"\n") + f"\nBuild: {build_tag}\n".encode()
            if not info.is_dir():
                digest = base64.urlsafe_b64encode(hashlib.sha256(blob).digest()).rstrip(b"=").decode()
                rows.append(f"{info.filename},sha256={digest},{len(blob)}")
            zi = zipfile.ZipInfo(info.filename, info.date_time)
            zi.external_attr, zi.compress_type = info.external_attr, zipfile.ZIP_DEFLATED
            zout.writestr(zi, blob)
        zout.writestr(record_name, "\n".join(rows + [f"{record_name},,"]) + "\n")
    return out


def library_names(data) -> list[tuple[int, str, int | None]]:
    """Where an ELF64 file names the libraries it needs: ``(file offset of the string, the string,
    file offset of its vna_hash or None)`` for each ``DT_NEEDED`` entry, each file of
    ``.gnu.version_r`` and each version name asked of it."""
    secs, _ = sections(data)

    def name_at(strtab: int, off: int) -> tuple[int, str]:
        start = secs[strtab][4] + off
        return start, bytes(data[start:data.index(0, start)]).decode()

    refs = []
    for _, sh_type, _, _, off, size, link, info, _, _ in secs:
        if sh_type == SHT_DYNAMIC:
            for pos in range(off, off + size, 16):
                tag, val = struct.unpack_from("<qQ", data, pos)
                if tag == 0:
                    break
                if tag == DT_NEEDED:
                    refs.append((*name_at(link, val), None))
        elif sh_type == SHT_GNU_VERNEED:
            pos = off
            for _ in range(info):
                _, cnt, file_, aux, nxt = struct.unpack_from("<HHIII", data, pos)
                refs.append((*name_at(link, file_), None))
                apos = pos + aux
                for _ in range(cnt):
                    _, _, _, vname, anext = struct.unpack_from("<IHHII", data, apos)
                    refs.append((*name_at(link, vname), apos))
                    apos += anext
                pos += nxt
    return refs


def rename_needed(path: Path, renames: dict[str, str]) -> list[str]:
    """Rename, in place, the libraries an ELF64 little-endian shared object needs (``DT_NEEDED``)
    and the version names it asks of them (``.gnu.version_r``): ``{old: new}``, each ``new`` as
    long as its ``old``. Returns what was renamed (``[]`` when nothing matched: already done).
    Raises ValueError for another kind of file, or a name shared as the tail of a longer string."""
    for old, new in renames.items():
        if len(old) != len(new):
            raise ValueError(f"{old!r} -> {new!r}: a rename in place keeps the length")
    data = bytearray(Path(path).read_bytes())
    done = []
    for start, name, hash_at in library_names(data):
        if name not in renames:
            continue
        if data[start - 1] != 0:
            raise ValueError(f"{path}: {name!r} is the tail of a longer string; renaming it would change that too")
        new = renames[name].encode()
        data[start:start + len(new)] = new
        if hash_at is not None:
            struct.pack_into("<I", data, hash_at, elf_hash(new))
        done.append(f"{name} -> {renames[name]}" + (" (version)" if hash_at is not None else ""))
    if done:
        Path(path).write_bytes(bytes(data))
    return done


def find_library(name: str) -> str | None:
    """The directory holding ``name``: pip's CUDA packages on this Python's path (``nvidia/cu13/lib``,
    ``nvidia/*/lib``), then the usual CUDA folders, then the loader's cache."""
    roots = [Path(p) for p in sys.path if p]
    patterns = [str(r / "nvidia" / sub / "lib" / name) for r in roots for sub in ("cu13", "*")]
    patterns += [f"/usr/local/cuda*/lib64/{name}", f"/usr/local/cuda*/targets/x86_64-linux/lib/{name}",
                 f"/usr/lib/x86_64-linux-gnu/{name}"]
    for pattern in patterns:
        hits = sorted(glob.glob(pattern))
        if hits:
            return str(Path(hits[0]).parent)
    try:
        out = subprocess.run(["ldconfig", "-p"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    for line in out.splitlines():
        if line.strip().startswith(name + " ") and "=>" in line:
            return str(Path(line.split("=>")[1].strip()).parent)
    return None


def probe(env: dict) -> dict:
    """Import faiss in a fresh process under ``env``: its version and GPU count, or the error."""
    r = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env=env, timeout=120)
    if r.returncode == 0:
        return {"ok": True, **json.loads(r.stdout.strip().splitlines()[-1])}
    return {"ok": False, "error": (r.stderr or r.stdout).strip()[-1500:]}


def with_library_path(env: dict, *dirs: str) -> dict:
    path = [d for d in dirs if d] + [p for p in env.get("LD_LIBRARY_PATH", "").split(":") if p]
    return {**env, "LD_LIBRARY_PATH": ":".join(path)}


def prepare(cuda12: str | None) -> tuple[dict, dict]:
    """Make faiss importable with its GPU for the child processes of the check (there).

    cuda12: the folder holding the carried ``libcudart.so.12`` (or None). Returns (environment
    for the children, a record of what was tried). Tries, each in a fresh process: faiss as
    installed; with its own pre-load of the ``nvidia-*-cu12`` wheels off (faiss-gpu's marker file
    set aside, faiss-gpu-cu12's variable set) and the carried CUDA 12 runtime on
    ``LD_LIBRARY_PATH``; then, if cuBLAS 12 is still missing and cuBLAS 13 is found, with the
    installed ``libfaiss`` renamed to cuBLAS 13 (:func:`rename_needed`) and its folder on the path."""
    env = dict(os.environ)
    record: dict = {"tries": []}

    def attempt(how: str, e: dict) -> bool:
        r = probe(e)
        record["tries"].append({"how": how, **r})
        return r["ok"] and r.get("gpus", 0) > 0

    if attempt("as installed", env):
        return env, {**record, "used": "as installed"}
    package = faiss_package()
    if package is None:
        return env, {**record, "used": None, "error": "no faiss package is installed"}
    marker = package / PRELOAD_MARKER
    if marker.is_file():
        marker.rename(marker.with_name(marker.name + ".off"))
        record["preload_marker_set_aside"] = str(marker)
    env = with_library_path({**env, "_FAISS_WHEEL_DISABLE_CUDA_PRELOAD": "1"}, cuda12 or "")
    if attempt("pre-load off, carried CUDA 12 runtime on LD_LIBRARY_PATH", env):
        return env, {**record, "used": "carried CUDA 12 runtime"}
    cublas13 = find_library("libcublas.so.13")
    libs = sorted(package.parent.glob("faiss*.libs/libfaiss*.so")) + sorted(package.glob("libfaiss*.so"))
    record.update(cublas13_dir=cublas13, libfaiss=[str(p) for p in libs])
    if cublas13 is None or not libs:
        return env, {**record, "used": None}
    record["renamed"] = {str(p): rename_needed(p, CUBLAS_12_TO_13) for p in libs}
    env = with_library_path(env, cublas13)
    ok = attempt("libfaiss renamed to cuBLAS 13, its folder on LD_LIBRARY_PATH", env)
    return env, {**record, "used": "renamed to cuBLAS 13" if ok else None}


def faiss_package() -> Path | None:
    """The installed ``faiss/`` folder, found without importing faiss (that import is what fails)."""
    import importlib.util

    spec = importlib.util.find_spec("faiss")
    return None if spec is None or spec.origin is None else Path(spec.origin).parent


def main(argv=None) -> int:
    """``python -m benchmarks.faiss_cuda trim SRC.whl DEST/``: SRC with only sm_90 machine code."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m benchmarks.faiss_cuda", description=main.__doc__)
    p.add_argument("action", choices=["trim"])
    p.add_argument("wheel", type=Path)
    p.add_argument("dest", type=Path)
    p.add_argument("--arch", type=int, default=90, help="the compute capability kept, as 90 for sm_90")
    args = p.parse_args(argv)
    stats = {}

    def edit(name: str, path: Path) -> bool:
        if not (name.endswith(".so") and "libfaiss" in name):
            return False
        stats[name] = trim_fatbins(path, args.arch)
        return True

    out = repack_wheel(args.wheel, args.dest, f"1sm{args.arch}", edit=edit)
    print(json.dumps({"wheel": str(out), "mb": round(out.stat().st_size / 1e6, 1), "trimmed": stats}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
