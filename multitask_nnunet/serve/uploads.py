"""What ``POST /predict`` receives: a multipart body streamed to files in the service's private folder, under names
the server makes (the client's file names never reach the file system), counted against the size limit as it
arrives; then each file checked to be NIfTI and given its channel from its name (nnU-Net's ``_XXXX`` suffix).

Every problem is a ``ServiceError`` (HTTP status and one line), the server's own disk too (``storage_error``: 507
when it is full, 503 when it cannot be written). Needs python-multipart (the serve extra).
"""
import gzip
import os
import re
import struct
import zlib
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

from python_multipart.multipart import MultipartParseError, MultipartParser, parse_options_header

from multitask_nnunet.errors import write_failure
from multitask_nnunet.io.nifti import channel_gaps, channel_pattern, describe_channels


NIFTI_ENDINGS = (".nii.gz", ".nii")
EMPTY = "empty request: upload one NIfTI file (.nii or .nii.gz) per channel as multipart/form-data"


class ServiceError(Exception):
    """A request the service answers with ``status`` and the one-line ``message``."""

    def __init__(self, status: int, message: str, headers: Optional[Dict[str, str]] = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}


def storage_error(error: BaseException, what: str) -> Optional[ServiceError]:
    """The answer when the server cannot store ``what`` (e.g. "the upload") because of its own disk: 507 when the
    disk is full or over quota (the same request succeeds once there is room), 503 when it is read-only or not
    writable; None for any other error. The message names no server path."""
    failure = write_failure(error, what)
    if failure is None:
        return None
    if failure.no_room:
        return ServiceError(507, f"the server has no room to store {what} ({failure.reason}); retry once it has")
    return ServiceError(503, f"the server cannot store {what} ({failure.reason})")


@dataclass
class Upload:
    name: str       # the client's file name, reduced to a safe base name: for messages only
    path: str       # where the server wrote it (a name of its own)
    size: int = 0


def safe_name(name: str) -> str:
    """The base name of a client's file name (either kind of slash), printable characters only, at most 200."""
    base = re.split(r"[/\\]", name)[-1]
    base = "".join(c for c in base if c.isprintable() and c not in "\"'<>`")
    return base[:200] or "upload"


class UploadReceiver:
    """Feed it the request body's chunks (``write``), then ``finish`` for the files. Raises ``ServiceError``: 413
    beyond ``max_bytes`` (the whole body counts), 400 for a body that is not multipart."""

    def __init__(self, folder: str, content_type: str, max_bytes: int):
        self.folder, self.max_bytes, self.received = folder, max_bytes, 0
        if not content_type:
            raise ServiceError(400, EMPTY)
        kind, params = parse_options_header(content_type)
        if kind != b"multipart/form-data" or not params.get(b"boundary"):
            raise ServiceError(415, f"content type {content_type}: upload one NIfTI file per channel as "
                                    f"multipart/form-data")
        self.uploads: List[Upload] = []
        self._file = None
        self._header, self._value, self._disposition = b"", b"", b""
        self._parser = MultipartParser(params[b"boundary"], {
            "on_part_begin": self._part_begin, "on_part_data": self._part_data, "on_part_end": self._part_end,
            "on_header_field": self._header_field, "on_header_value": self._header_value,
            "on_header_end": self._header_end, "on_headers_finished": self._headers_finished})

    def write(self, chunk: bytes) -> None:
        self.received += len(chunk)
        if self.received > self.max_bytes:
            self.close()
            raise ServiceError(413, f"upload larger than the limit of {describe_bytes(self.max_bytes)} "
                                    f"(serve --max-upload-mb)")
        try:
            self._parser.write(chunk)
        except MultipartParseError as e:
            self.close()
            raise ServiceError(400, f"malformed multipart body ({e})") from None
        except OSError as e:  # writing the upload's file: the server's disk
            self.close()
            raise (storage_error(e, "the upload") or e) from None

    def finish(self) -> List[Upload]:
        try:
            self._parser.finalize()
            self._end_file()
        except MultipartParseError as e:
            raise ServiceError(400, f"malformed multipart body ({e})") from None
        except OSError as e:
            raise (storage_error(e, "the upload") or e) from None
        finally:
            self.close()
        if not self.uploads:
            raise ServiceError(400, EMPTY)
        for upload in self.uploads:
            if upload.size == 0:
                raise ServiceError(400, f"{upload.name}: empty file")
        return self.uploads

    def close(self) -> None:
        """Close the file being received (cleaning up after an error: what it could not write is dropped, the
        caller removes the folder)."""
        try:
            self._end_file()
        except OSError:
            pass

    def _end_file(self) -> None:
        """Close the file being received; raises the error of writing its last bytes (e.g. a full disk)."""
        if self._file is not None:
            file, self._file = self._file, None
            file.close()

    # python-multipart's callbacks
    def _part_begin(self):
        self._disposition = b""

    def _header_field(self, data, start, end):
        self._header += data[start:end]

    def _header_value(self, data, start, end):
        self._value += data[start:end]

    def _header_end(self):
        if self._header.lower() == b"content-disposition":
            self._disposition = self._value
        self._header, self._value = b"", b""

    def _headers_finished(self):
        _, options = parse_options_header(self._disposition)
        if b"filename" in options and options[b"filename"]:  # a form's other fields are ignored (but counted)
            path = os.path.join(self.folder, f"upload_{len(self.uploads)}")
            self.uploads.append(Upload(safe_name(options[b"filename"].decode("utf-8", "replace")), path))
            self._file = open(path, "xb")

    def _part_data(self, data, start, end):
        if self._file is not None:
            self._file.write(data[start:end])
            self.uploads[-1].size += end - start

    def _part_end(self):
        self._end_file()


def describe_bytes(n: int) -> str:
    return f"{n / 2 ** 30:g} GiB" if n >= 2 ** 30 else f"{n / 2 ** 20:g} MiB"


def check_nifti(upload: Upload) -> str:
    """The upload's NIfTI ending (from its name); 415 unless its name ends in .nii/.nii.gz and its header is a
    NIfTI-1 or NIfTI-2 header (a truncated or otherwise corrupt file is found when it is read)."""
    ending = next((e for e in NIFTI_ENDINGS if upload.name.lower().endswith(e)), None)
    if ending is None:
        raise ServiceError(415, f"{upload.name}: not a NIfTI file name (need .nii or .nii.gz)")
    try:
        with open(upload.path, "rb") as f:
            gzipped = f.read(2) == b"\x1f\x8b"
        with (gzip.open if gzipped else open)(upload.path, "rb") as f:
            header = f.read(540)
    except (OSError, EOFError, zlib.error) as e:
        raise ServiceError(415, f"{upload.name}: not a NIfTI file (cannot decompress: {e})") from None
    if not _is_nifti_header(header):
        raise ServiceError(415, f"{upload.name}: not a NIfTI file (no NIfTI-1 or NIfTI-2 header)")
    return ending


def _is_nifti_header(header: bytes) -> bool:
    if len(header) >= 348 and 348 in (struct.unpack("<i", header[:4])[0], struct.unpack(">i", header[:4])[0]):
        return header[344:348] in (b"n+1\0", b"ni1\0")
    if len(header) >= 540 and 540 in (struct.unpack("<i", header[:4])[0], struct.unpack(">i", header[:4])[0]):
        return header[4:8] in (b"n+2\0", b"ni2\0")
    return False


def assign_channels(uploads: List[Upload], channel_names: Dict[str, str]) -> Tuple[str, List[Tuple[Upload, str]]]:
    """(case name, [(upload, ending)] in channel order). One file for a one-channel model may have any NIfTI
    name; otherwise the names carry nnU-Net's channel suffixes, ``<case>_0000.nii.gz``, ``<case>_0001.nii.gz``..."""
    endings = [check_nifti(u) for u in uploads]
    expected = len(channel_names)
    described = describe_channels(channel_names)
    if len(uploads) != expected:
        raise ServiceError(422, f"{len(uploads)} file(s) uploaded ({', '.join(u.name for u in uploads)}); the model "
                                f"expects {expected} channel(s): {described}")
    if expected == 1:
        name = uploads[0].name[:-len(endings[0])]
        match = channel_pattern("").fullmatch(name)
        return (match.group(1) if match else name) or "case", [(uploads[0], endings[0])]
    pattern = channel_pattern(*NIFTI_ENDINGS)
    channels: Dict[int, Tuple[Upload, str]] = {}
    cases = set()
    for upload, ending in zip(uploads, endings):
        match = pattern.fullmatch(upload.name)
        if match is None:
            raise ServiceError(400, f"{upload.name}: not named <case>_XXXX{ending} (nnU-Net channel naming; the "
                                    f"model expects {expected} channels: {described})")
        cases.add(match.group(1))
        channels[int(match.group(2))] = (upload, ending)
    missing = [f"{c:04d}" for c in channel_gaps(channels, expected)[0]]
    if len(cases) > 1 or missing:
        raise ServiceError(422, f"uploaded {', '.join(u.name for u in uploads)}: need one case with channels "
                                f"{described}" + (f" (missing {', '.join(missing)})" if missing else ""))
    return cases.pop(), [channels[c] for c in range(expected)]
