"""Build a folder beside its final place and swap it in at the end, so a crash never leaves half of it."""
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Sequence


@contextmanager
def staged_folder(target: Path, replaces: Sequence[Path] = ()) -> Iterator[Path]:
    """Yield an empty hidden folder next to ``target``; on success it becomes ``target``.

    The folders in ``replaces`` (which may include ``target``) are moved aside only once the new folder is
    complete and deleted after it is in place. On any exception the staged folder is removed and the old
    folders are left untouched. The folder is hidden (leading dot) so nnU-Net's dataset lookup never sees it.
    """
    staged = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:8]}"
    staged.mkdir(parents=True)
    try:
        yield staged
        retired = []
        for old in replaces:
            if old.exists():
                aside = old.parent / f".{old.name}.old-{uuid.uuid4().hex[:8]}"
                old.rename(aside)
                retired.append(aside)
        staged.rename(target)
        for aside in retired:
            shutil.rmtree(aside)
    finally:
        if staged.exists():
            shutil.rmtree(staged)
