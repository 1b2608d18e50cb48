"""The output folder of a command-line tool, handled so that no user file is ever lost.

:class:`OutputFolder` checks ``--out`` before any work: it must not be (or contain) the current
folder or an input, and an existing folder is replaced (with ``--overwrite``) only if every
file in it is listed in the manifest that the tool wrote there. Results go to a hidden temporary
folder beside ``--out`` that replaces it only after success; on failure, Ctrl-C or SIGTERM the
temporary folder (and any parent folders it created) is removed.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import sys
import tempfile
import threading
from collections.abc import Iterable
from pathlib import Path

from dcc.data.io import InputError

MANIFEST = ".dcc-register-manifest.json"
SIGNALS = (signal.SIGINT, signal.SIGTERM)


class OutputFolder:
    """``with OutputFolder(out, inputs, overwrite) as tmp:`` write into ``tmp``, then
    :meth:`commit`. Leaving the block without ``commit`` removes everything written."""

    def __init__(self, out: str | os.PathLike, inputs: Iterable[str], overwrite: bool, tool: str):
        self.out = Path(out)
        self.overwrite = overwrite
        self.tool = tool
        self.tmp: Path | None = None
        self._created: list[Path] = []
        self._check(list(inputs))

    # ------------------------------------------------------------------ checks
    def _check(self, inputs: list[str]) -> None:
        out, name = self.out.resolve(), f"--out {self.out}"
        if out.exists() and not out.is_dir():
            raise InputError(f"{name}: exists and is not a folder")
        cwd = Path.cwd().resolve()
        if out == cwd or out in cwd.parents:
            raise InputError(
                f"{name}: is the current folder or contains it; give a new folder for the results"
            )
        for path in inputs:
            resolved = Path(path).resolve()
            if out == resolved or out in resolved.parents:
                raise InputError(
                    f"{name}: contains the input {path}; give a folder that holds no inputs"
                )
            if resolved.is_dir() and resolved in out.parents:
                raise InputError(f"{name}: lies inside the input folder {path}")
        if out.exists():
            if not self.overwrite:
                raise InputError(
                    f"{name}: folder exists (use --overwrite to replace a folder that "
                    f"{self.tool} wrote)"
                )
            self._check_replaceable(out)

    def _check_replaceable(self, out: Path) -> None:
        """Every file in ``out`` must be listed in its manifest (an empty folder is fine)."""
        found = _files(out)
        if not found:
            return
        listed = _read_manifest(out)
        if listed is None:
            raise InputError(
                f"--out {self.out}: folder was not written by {self.tool} (no {MANIFEST}); "
                "refusing to replace it, give a new folder"
            )
        foreign = sorted(found - listed - {MANIFEST})
        if foreign:
            more = f" and {len(foreign) - 1} more" if len(foreign) > 1 else ""
            raise InputError(
                f"--out {self.out}: holds files {self.tool} did not write ({foreign[0]}{more}); "
                "refusing to replace it, move them or give a new folder"
            )

    # ------------------------------------------------------------------ life cycle
    def __enter__(self) -> Path:
        parent = self.out.resolve().parent
        missing = [p for p in (parent, *parent.parents) if not p.exists()]
        try:
            for folder in reversed(missing):
                folder.mkdir()
                self._created.append(folder)
            self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.", dir=parent))
        except OSError as e:
            self._remove_created()
            raise InputError(f"--out {self.out}: cannot write there ({e.strerror})") from None
        self._previous = {}
        if threading.current_thread() is threading.main_thread():
            # a signal ignored at start (SIGINT in a background job, ``nohup``) stays ignored
            self._previous = {
                s: signal.signal(s, self._abort)
                for s in SIGNALS
                if signal.getsignal(s) is not signal.SIG_IGN
            }
        return self.tmp

    def __exit__(self, *exc) -> None:
        for s in self._previous:
            signal.signal(s, signal.SIG_IGN)
        self._remove_tmp()
        for s, handler in self._previous.items():
            signal.signal(s, handler)

    def _abort(self, signum, frame) -> None:
        """Ctrl-C or SIGTERM: remove what was written, say so in one line and exit with
        128 + the signal number. Exiting here rather than raising also works where Python
        would swallow an exception (e.g. in a callback during an import)."""
        for s in SIGNALS:
            signal.signal(s, signal.SIG_IGN)
        self._remove_tmp()
        word = "interrupted" if signum == signal.SIGINT else "terminated"
        sys.stdout.flush()
        print(f"{self.tool}: {word}; nothing written", file=sys.stderr, flush=True)
        os._exit(128 + signum)

    def _remove_tmp(self) -> None:
        if self.tmp is not None and self.tmp.exists():
            shutil.rmtree(self.tmp, ignore_errors=True)
            self._remove_created()

    def commit(self) -> None:
        """Write the manifest and move the results to ``--out``, replacing the old folder (whose
        files are checked against its manifest once more, then deleted one by one)."""
        assert self.tmp is not None
        written = sorted(_files(self.tmp))
        manifest = {"tool": self.tool, "files": written}
        (self.tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
        out = self.out.resolve()
        old = None
        if out.exists():
            self._check_replaceable(out)
        with _signals_ignored():  # the two renames happen together or not at all
            if out.exists():
                old = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.old.", dir=out.parent))
                os.replace(out, old / "out")
            os.replace(self.tmp, out)
        self._created = []
        if old is not None:
            _remove_listed(old / "out")
            _remove_empty_folders(old)

    def _remove_created(self) -> None:
        for folder in reversed(self._created):
            try:
                folder.rmdir()
            except OSError:
                break
        self._created = []


@contextlib.contextmanager
def _signals_ignored():
    """Ctrl-C and SIGTERM are ignored inside the block (only the main thread can do this)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, signal.SIG_IGN) for s in SIGNALS}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def _files(folder: Path) -> set[str]:
    """Relative paths (POSIX) of every non-folder entry under ``folder`` (links not followed)."""
    found = set()
    for root, dirs, files in os.walk(folder):
        rel = Path(root).relative_to(folder)
        found.update((rel / f).as_posix() for f in files)
        found.update((rel / d).as_posix() for d in dirs if (Path(root) / d).is_symlink())
    return found


def _read_manifest(folder: Path) -> set[str] | None:
    try:
        files = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return {f for f in files if isinstance(f, str)}


def _remove_listed(folder: Path) -> None:
    """Delete the files that the manifest of ``folder`` lists (inside ``folder`` only), and
    the manifest itself."""
    root = folder.resolve()
    for rel in sorted(_read_manifest(folder) or ()) + [MANIFEST]:
        path = folder / rel
        inside = root == path.parent.resolve() or root in path.parent.resolve().parents
        if inside and not Path(rel).is_absolute() and (path.is_file() or path.is_symlink()):
            path.unlink()


def _remove_empty_folders(folder: Path) -> None:
    for root, _, _ in sorted(os.walk(folder), key=lambda w: -len(Path(w[0]).parts)):
        try:
            Path(root).rmdir()
        except OSError:
            pass
