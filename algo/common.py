"""Small shared utilities: the error type every CLI turns into one clean line, the cache
directory, and atomic file/directory writes (nothing is ever half-written)."""
from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
from pathlib import Path


class AccllmError(Exception):
    """An error caused by the user's input or environment.

    The CLIs print its message as one line (``error: ...``) and exit non-zero instead of
    showing a traceback. The message must say what was wrong and what is accepted.
    """


def cache_dir(*parts: str) -> Path:
    """Cache directory of accllm: ``$ACCLLM_CACHE`` if set, else ``$XDG_CACHE_HOME/accllm``,
    else ``~/.cache/accllm``. Sub-directories given in *parts* are created."""
    root = os.environ.get("ACCLLM_CACHE")
    if not root:
        xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        root = os.path.join(xdg, "accllm")
    p = Path(root, *parts)
    p.mkdir(parents=True, exist_ok=True)
    return p


def source_root() -> Path:
    """The directory that holds accllm's top-level packages (algo, quant, hw, sim, host): the checkout,
    or the site-packages directory of an installed wheel."""
    return Path(__file__).resolve().parents[1]


def installed() -> bool:
    """True when accllm runs from an installed wheel (its packages sit in one of the interpreter's site
    directories), False in a checkout (editable installs included)."""
    import site
    import sysconfig
    sites = {*site.getsitepackages(), site.getusersitepackages(), sysconfig.get_paths()["purelib"],
             sysconfig.get_paths()["platlib"]}
    root = source_root()
    return any(Path(s).resolve() == root for s in sites if s and os.path.isdir(s))


def child_pythonpath(*first: str | os.PathLike) -> str:
    """PYTHONPATH for a child Python process that imports accllm: *first*, then the checkout (only when
    not installed: an installed wheel is found through the child's own site-packages, which must not go
    on PYTHONPATH ahead of the standard library), then this process's PYTHONPATH."""
    parts = [str(p) for p in first] + ([] if installed() else [str(source_root())])
    rest = os.environ.get("PYTHONPATH", "")
    return os.pathsep.join(parts + ([rest] if rest else []))


def package_file(package: str, *parts: str) -> Path:
    """A data file shipped inside *package* (read through importlib.resources), as a path on disk for the
    tools that need one (the simulators): the file itself, or, for a package that is not on the file
    system, a copy in the cache directory named by its content."""
    from importlib.resources import files
    res = files(package)
    for part in parts:
        res = res.joinpath(part)
    if isinstance(res, Path):
        if not res.is_file():
            raise AccllmError(f"accllm data file {package}/{'/'.join(parts)} is missing from {res.parent} "
                              f"(a broken install: reinstall accllm)")
        return res
    data = res.read_bytes()
    p = cache_dir("resources", package) / f"{hashlib.sha256(data).hexdigest()[:16]}-{parts[-1]}"
    if not p.is_file():
        atomic_write_bytes(p, data)
    return p


def package_dir(package: str, *parts: str) -> Path:
    """A data directory shipped inside *package* (e.g. the cocotb benches in sim/tb), as a path on disk."""
    from importlib.resources import files
    res = files(package)
    for part in parts:
        res = res.joinpath(part)
    if not isinstance(res, Path) or not res.is_dir():
        raise AccllmError(f"accllm data directory {package}/{'/'.join(parts)} is missing or not on the file "
                          f"system ({res}); reinstall accllm from its wheel")
    return res


def sha256_file(path: str | os.PathLike, bufsize: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(bufsize)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write *data* to *path* through a temporary file in the same directory and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


@contextlib.contextmanager
def file_lock(path: str | os.PathLike):
    """Hold an exclusive advisory lock on the file *path* (created if missing) for the ``with`` body:
    processes making the same cached artefact (pytest workers, two users) take turns."""
    import fcntl
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@contextlib.contextmanager
def atomic_directory(final: str | os.PathLike):
    """Yield a temporary directory beside *final*; on success it replaces *final* in one
    rename (an existing *final* is moved aside first and removed only after the new one
    is in place). On failure the temporary directory is removed and *final* is untouched."""
    final = Path(final).resolve()
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".partial", dir=final.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if final.exists():
        old = final.parent / f".{final.name}.old-{os.getpid()}"
        if old.exists():
            shutil.rmtree(old)
        os.replace(final, old)
    os.replace(tmp, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def stdout_to_stderr():
    """Send everything written to standard output inside the block to standard error instead: Python's
    prints, C libraries and child processes alike (file descriptor 1 is pointed at 2), so a command
    whose --json document goes to stdout afterwards prints nothing else there."""
    import sys
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        os.dup2(2, 1)
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)
