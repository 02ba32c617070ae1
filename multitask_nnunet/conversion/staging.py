"""Build a folder beside its final place and swap it in at the end, so a crash never leaves half of it.

The hidden names carry their owner (``atomic.owner_tag``), so that a run can remove what a killed run left
behind (``remove_leftover_staging``) without touching the folders of a run still in progress.
"""
import re
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, List, Sequence

from multitask_nnunet.io.atomic import owner_is_gone, owner_tag

STAGED, RETIRED = "tmp", "old"
# .<final name>.<tmp|old>-<host>-<pid>-<8 hex digits>
_HIDDEN = re.compile(r"\.(?P<name>.+)\.(?P<kind>tmp|old)-(?P<host>.+)-(?P<pid>\d+)-[0-9a-f]{8}")


def _hidden(folder: Path, kind: str) -> Path:
    return folder.parent / f".{folder.name}.{kind}-{owner_tag()}-{uuid.uuid4().hex[:8]}"


@contextmanager
def staged_folder(target: Path, replaces: Sequence[Path] = ()) -> Iterator[Path]:
    """Yield an empty hidden folder next to ``target``; on success it becomes ``target``.

    The folders in ``replaces`` (which may include ``target``) are moved aside only once the new folder is
    complete and deleted after it is in place. On any exception the staged folder is removed and the old
    folders are left untouched. The folder is hidden (leading dot) so nnU-Net's dataset lookup never sees it.
    """
    staged = _hidden(target, STAGED)
    staged.mkdir(parents=True)
    try:
        yield staged
        retired = []
        for old in replaces:
            if old.exists():
                aside = _hidden(old, RETIRED)
                old.rename(aside)
                retired.append(aside)
        staged.rename(target)
        for aside in retired:
            shutil.rmtree(aside)
    finally:
        if staged.exists():
            shutil.rmtree(staged)


def final_path(path) -> Path:
    """Where a path inside a staged folder ends up once the folder is swapped in (``.NAME.tmp-...`` -> ``NAME``),
    for messages about what could not be written; other paths as they are."""
    parts = [match["name"] if (match := _HIDDEN.fullmatch(part)) and match["kind"] == STAGED else part
             for part in Path(path).parts]
    return Path(*parts)


def in_staged_folder(path) -> bool:
    return final_path(path) != Path(path)


def remove_leftover_staging(parent: Path) -> List[str]:
    """Clean up after ``staged_folder`` calls in ``parent`` whose process is gone (killed): staged folders are
    removed, and so are folders moved aside, unless the process died between moving them aside and renaming its
    staged folder into place (its staged folder is still there): then they are put back. Returns one description
    per leftover."""
    if not parent.is_dir():
        return []
    leftovers = [(entry, match) for entry in sorted(parent.iterdir())
                 if (match := _HIDDEN.fullmatch(entry.name)) and entry.is_dir()
                 and owner_is_gone(match["host"], match["pid"])]
    unfinished = {(m["host"], m["pid"]) for _, m in leftovers if m["kind"] == STAGED}
    done = []
    for entry, match in leftovers:
        original = parent / match["name"]
        if match["kind"] == RETIRED and (match["host"], match["pid"]) in unfinished and not original.exists():
            entry.rename(original)
            done.append(f"{entry.name} (put back as {original.name})")
        else:
            shutil.rmtree(entry, ignore_errors=True)
            done.append(entry.name)
    return done
