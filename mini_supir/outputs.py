"""Where a batch tool's results go: one name per input, the files each input produces, a folder checked
for writing before any work (without creating it), and never a result written over an input."""
from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Iterable


def output_names(files: list[Path]) -> dict[Path, str]:
    """Output stem per input: its stem, or stem_ext where two inputs share a stem (a.jpg, a.png)."""
    stems: dict[str, list[Path]] = {}
    for f in files:
        stems.setdefault(f.stem, []).append(f)
    return {f: f.stem if len(group) == 1 else f"{f.stem}_{f.suffix.lstrip('.')}" for group in stems.values() for f in group}


def outputs_for(stem: str, out: Path, num_samples: int = 1, compare: bool = False, repairing: bool = False
                ) -> list[Path]:
    """The files restoring one input writes: <stem>.png (<stem>_<k>.png with several samples), their
    _compare.png panels, and with repair the <stem>_mask.png."""
    names = [stem] if num_samples == 1 else [f"{stem}_{k}" for k in range(num_samples)]
    return [out / f"{n}.png" for n in names] + ([out / f"{n}_compare.png" for n in names] if compare else []) \
        + ([out / f"{stem}_mask.png"] if repairing else [])


def check_writable(folder: str | Path) -> None:
    """Raise OSError unless files can be written in `folder` or, where it does not exist yet, in the nearest
    folder above it that does (where it will be made). Creates nothing: images.atomic_write makes the folder
    with the first file, so a run that fails early leaves no empty folder behind."""
    existing = Path(folder).absolute()
    while not os.path.lexists(existing):
        existing = existing.parent
    if not existing.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(existing))
    if os.statvfs(existing).f_flag & os.ST_RDONLY:
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(existing))
    if not os.access(existing, os.W_OK | os.X_OK):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(existing))


def overwritten_inputs(outputs: Iterable[Path], inputs: Iterable[Path]) -> list[tuple[Path, Path]]:
    """(output, input) pairs where an output would be written over an input: the same file, by path, by a
    link or on a case-insensitive file system (compared by device and inode)."""
    ids = {}
    for f in inputs:
        try:
            st = os.stat(f)
        except OSError:
            continue
        ids[st.st_dev, st.st_ino] = f
    clashes = []
    for o in outputs:
        try:
            st = os.stat(o)
        except OSError:
            continue
        if (st.st_dev, st.st_ino) in ids:
            clashes.append((o, ids[st.st_dev, st.st_ino]))
    return clashes
