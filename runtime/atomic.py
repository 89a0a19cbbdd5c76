"""Write files so that a reader never sees half of one: temporary name in the same folder, then rename."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

from .errors import UserError


def check_writable(path: str | os.PathLike, flag: str, folder: bool = False) -> None:
    """Refuse, before any long work, an output path that cannot be written (a folder where a file is
    wanted, or a file where a folder is wanted, or a file on the way to it)."""
    target = Path(path)
    if folder:
        if target.exists() and not target.is_dir():
            raise UserError(f"{flag} {target}: is a file; give a folder")
    elif target.is_dir():
        raise UserError(f"{flag} {target}: is a folder; give the path of a file to write")
    for parent in target.parents:
        if parent.exists():
            if not parent.is_dir():
                raise UserError(f"{flag} {target}: cannot write there ({parent} is a file)")
            break


def write_atomic(path: str | os.PathLike, data: str | bytes) -> Path:
    """Write `data` to `path` atomically; the old file (if any) stays intact until the rename."""
    target = Path(path)
    # The path comes from the user (--out, --trace-out): a folder or an unwritable place is their mistake.
    if target.is_dir():
        raise UserError(f"{target}: is a folder; give the path of a file to write")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        mode = "wb" if isinstance(data, bytes) else "w"
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    except (FileExistsError, NotADirectoryError):
        raise UserError(f"{target}: cannot write there (a part of the folder path is a file)") from None
    except PermissionError as exc:
        raise UserError(f"{target}: cannot write there ({exc.strerror})") from None
    try:
        with os.fdopen(fd, mode, **({} if mode == "wb" else {"encoding": "utf-8"})) as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        # mkstemp creates the file 0600; give it the mode the old file had, else what the umask allows
        if target.exists():
            os.chmod(tmp, target.stat().st_mode & 0o7777)
        else:
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target
