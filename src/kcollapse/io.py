"""Crash-safe file I/O for run directories.

A collapse study runs for hours; a kill at any moment must leave either the old file or the new one, never half
of one. Every file is written to a temporary sibling and renamed into place (atomic on POSIX); JSONL files are
rewritten the same way, so a line is complete or absent. A run directory is locked by the live process using it.
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import re
import shutil
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterable

from kcollapse.errors import UserError


def _json_default(obj: Any):
    if hasattr(obj, "item"):  # numpy / torch scalars
        return obj.item()
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


_SURROGATE = re.compile("[\ud800-\udfff]")


def scrub_surrogates(text: str) -> str:
    """Lone surrogates (invalid Unicode, e.g. from a JSON corpus) become U+FFFD, so any UTF-8/JSON reader accepts them."""
    return _SURROGATE.sub("\ufffd", text)


def _clean_float(value: Any) -> Any:
    """JSON has no NaN/inf: write them as null so every line stays valid JSON (and lone surrogates as U+FFFD)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, str):
        return scrub_surrogates(value)
    if isinstance(value, dict):
        return {(scrub_surrogates(k) if isinstance(k, str) else k): _clean_float(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean_float(v) for v in value]
    return value


def dumps(obj: Any) -> str:
    """One line of strict JSON: control characters escaped, lone surrogates replaced, so the line always parses
    (pandas' reader rejects an escaped lone surrogate)."""
    return json.dumps(_clean_float(obj), default=_json_default, ensure_ascii=True, allow_nan=False)


# C0/C1 control characters (ESC starts terminal escape sequences), DEL, bidi overrides; \n and \t are kept.
_TERMINAL_UNSAFE = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069\ud800-\udfff]")


def sanitize_terminal(text: Any, limit: int = 2000) -> str:
    """Text that came from a model, a corpus or a user file, made safe to print: control characters, escape
    sequences, bidi overrides and lone surrogates become visible `<U+XXXX>` markers; very long text is cut."""
    text = str(text)
    if len(text) > limit:
        text = text[:limit] + f"[... {len(text) - limit:,} more characters]"
    return _TERMINAL_UNSAFE.sub(lambda m: f"<U+{ord(m.group()):04X}>", text)


def current_umask() -> int:
    """The process umask, read without changing it where Linux allows (os.umask would race other threads)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_text(path: str | Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~current_umask())  # mkstemp makes 0600: a shared run directory must stay readable
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(scrub_surrogates(text))  # always valid UTF-8
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(_clean_float(obj), default=_json_default, indent=2, allow_nan=False) + "\n")


def write_jsonl(path: str | Path, records: Iterable[dict]) -> None:
    atomic_write_text(path, "".join(dumps(r) + "\n" for r in records))


def read_jsonl(path: str | Path) -> list[dict]:
    path = Path(path)
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise UserError(f"{path}: line {lineno} is not valid JSON ({e.msg})") from None
    return rows


def atomic_replace_dir(tmp_dir: Path, final_dir: Path) -> None:
    """Move a fully written directory into place; an older one at final_dir is removed first."""
    final_dir = Path(final_dir)
    if final_dir.exists():
        trash = final_dir.with_name(f".{final_dir.name}.old")
        shutil.rmtree(trash, ignore_errors=True)
        os.replace(final_dir, trash)
        os.replace(tmp_dir, final_dir)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(tmp_dir, final_dir)


class RunLock:
    """An exclusive lock on a run directory held by one live process.

    RUN_DIR/.lock records the owner (pid, host, command) and is held with `flock`, which the kernel drops when the
    process dies: a lock left by a killed run (its pid gone) is taken over, a live one is refused naming its process.
    Where flock is unavailable (some network file systems), the recorded pid alone decides.
    """

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / ".lock"
        self._fd: int | None = None

    @staticmethod
    def _owner(path: Path) -> dict:
        try:
            text = path.read_text(encoding="utf-8", errors="replace").strip()
        except OSError:
            return {}
        try:
            info = json.loads(text)
            return info if isinstance(info, dict) else {}
        except ValueError:  # an older lock file: the pid alone
            return {"pid": int(text)} if text.isdigit() else {}

    def _refusal(self, info: dict) -> UserError:
        cmd = sanitize_terminal(info.get("cmd") or "kcollapse", limit=120)
        host = info.get("host")
        where = f" on {host}" if host and host != socket.gethostname() else ""
        since = f", since {info['started']}" if info.get("started") else ""
        return UserError(f"{self.path.parent} is in use by a running kcollapse process (pid {info.get('pid', '?')}{where}: "
                         f"{cmd}{since}); wait for it to finish or stop it first")

    def held_by_other(self) -> dict | None:
        """The owner of a live lock held by another process, or None (no lock, or a stale one)."""
        if not self.path.exists():
            return None
        info = self._owner(self.path)
        try:
            fd = os.open(self.path, os.O_RDWR)
        except OSError:
            return None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return info or {"pid": "?"}
            except OSError:  # no flock here: trust the pid
                return info if _owner_alive(info) else None
            fcntl.flock(fd, fcntl.LOCK_UN)
            return None
        finally:
            os.close(fd)

    def check(self) -> None:
        """Refuse early (before minutes of model loading) when a live process holds this run directory."""
        owner = self.held_by_other()
        if owner is not None:
            raise self._refusal(owner)

    def __enter__(self) -> "RunLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(100):
            fd = os.open(self.path, os.O_CREAT | os.O_RDWR, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                info = self._owner(self.path)
                os.close(fd)
                raise self._refusal(info or {"pid": "?"}) from None
            except OSError:  # flock unsupported: fall back to the recorded pid
                info = self._owner(self.path)
                if info.get("pid") != os.getpid() and _owner_alive(info):
                    os.close(fd)
                    raise self._refusal(info) from None
            try:  # the file we locked must still be the one at the path (not unlinked by an exiting owner)
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if not same:
                os.close(fd)
                continue
            # ours now (new, or the stale lock of a dead process taken over): record who holds it
            record = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
                      "cmd": " ".join(os.path.basename(a) if i == 0 else a for i, a in enumerate(sys.argv))[:300]}
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(record).encode(), 0)
            self._fd = fd
            return self
        raise UserError(f"{self.path}: could not take the run directory lock")

    def __exit__(self, *exc) -> None:
        if self._fd is not None:
            self.path.unlink(missing_ok=True)  # unlink while still holding it: a waiter re-checks the inode
            os.close(self._fd)
            self._fd = None


_TEMP_FILE = re.compile(r"^\..+\.tmp$")  # atomic_write_text's temporaries
_TEMP_DIR = re.compile(r"^\.(model|answers)\.(tmp.*|old)$|^\.trainer$")  # save_model / copies / Trainer work dirs


def remove_stale_temp(run_dir: Path) -> int:
    """Delete the temporaries a killed run left (half-written files and checkpoints); call it holding the RunLock.
    They never look finished (names start with '.'), but a half-written checkpoint can take gigabytes."""
    run_dir = Path(run_dir)
    removed = 0
    roots = [run_dir] + [d for d in (run_dir / "arms", run_dir / "gen_0") if d.is_dir()]
    for root in roots:
        entries = root.iterdir() if root == run_dir else root.rglob(".*")
        for entry in list(entries):
            if entry.is_dir() and not entry.is_symlink() and _TEMP_DIR.match(entry.name):
                shutil.rmtree(entry, ignore_errors=True)
                removed += 1
            elif entry.is_file() and _TEMP_FILE.match(entry.name):
                entry.unlink(missing_ok=True)
                removed += 1
    return removed


def _owner_alive(info: dict) -> bool:
    pid = info.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return False
    if info.get("host") not in (None, socket.gethostname()):
        return True  # another machine's process: cannot check, assume alive
    return _pid_alive(pid)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie (killed child not yet reaped) is not alive
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return True
