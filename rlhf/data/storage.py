"""Read and write files named by URI: local paths and `gs://bucket/path`, with globs for either.

Google Cloud Storage goes through the official client library. Credentials come from the environment
(Application Default Credentials); when `STORAGE_EMULATOR_HOST` is set the client talks to that
emulator anonymously, which is how the tests run it against a real local server.
"""

from __future__ import annotations

import glob
import os
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from urllib.parse import urlsplit

from rlhf.errors import UserError

GCS_PREFIX = "gs://"
_GLOB_CHARS = re.compile(r"[*?\[]")


class StorageError(UserError):
    """A URI that cannot be listed or read; the message names the URI."""

    def __init__(self, uri: str, reason: str):
        super().__init__(f"{uri}: {reason}")
        self.uri = uri
        self.reason = reason


@dataclass(frozen=True)
class GcsPath:
    bucket: str
    name: str

    @classmethod
    def parse(cls, uri: str) -> GcsPath:
        rest = uri[len(GCS_PREFIX):]
        bucket, _, name = rest.partition("/")
        if not bucket:
            raise StorageError(uri, "a gs:// URI needs a bucket name: gs://BUCKET/PATH")
        return cls(bucket, name)


def is_gcs(uri: str) -> bool:
    return uri.startswith(GCS_PREFIX)


def has_glob(uri: str) -> bool:
    return bool(_GLOB_CHARS.search(uri))


@lru_cache(maxsize=1)
def gcs_client():
    """One storage client per process: ADC when the environment has credentials, else anonymous.

    Anonymous access reads public buckets, such as the course's sample data, and any emulator.
    """
    import google.auth
    import google.auth.exceptions
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage

    if os.environ.get("STORAGE_EMULATOR_HOST"):
        return storage.Client(project="local-emulator", credentials=AnonymousCredentials())
    try:
        credentials, project = google.auth.default()
    except google.auth.exceptions.DefaultCredentialsError:
        return storage.Client.create_anonymous_client()
    return storage.Client(project=project, credentials=credentials)


def _unresolved_host(error: BaseException) -> bool:
    """Whether a transport error is a host name that did not resolve (offline, or a mistyped
    STORAGE_EMULATOR_HOST): retrying that only delays the same failure."""
    import urllib3.exceptions

    seen = [error]
    while seen:
        current = seen.pop()
        if isinstance(current, urllib3.exceptions.NameResolutionError):
            return True
        seen += [e for e in (current.__cause__, current.__context__, getattr(current, "reason", None),
                             *getattr(current, "args", ())) if isinstance(e, BaseException)]
    return False


@lru_cache(maxsize=1)
def _retry():
    """The client's own retry policy, less the retries of an unresolved host name: the call then fails at
    once, not after two minutes of retries."""
    from google.cloud.storage.retry import DEFAULT_RETRY, _should_retry

    return DEFAULT_RETRY.with_predicate(lambda error: _should_retry(error) and not _unresolved_host(error))


def _gcs_call(uri: str, action):
    from google.api_core import exceptions as gexc

    try:
        return action()
    except gexc.NotFound:
        raise StorageError(uri, "not found") from None
    except gexc.Forbidden:
        raise StorageError(uri, "permission denied (check the credentials and the bucket's IAM)") from None
    except gexc.GoogleAPICallError as error:
        raise StorageError(uri, f"Cloud Storage error: {error.message}") from None
    except Exception as error:  # auth and transport errors have many types; all end the same way
        if _unresolved_host(error):
            host = urlsplit(gcs_client().api_endpoint).hostname
            raise StorageError(uri, f"cannot reach Cloud Storage: its host {host} does not resolve; are you "
                                    "offline?") from None
        raise StorageError(uri, f"cannot reach Cloud Storage: {type(error).__name__}: {error}") from None


def expand(uri: str) -> list[str]:
    """The files a URI names, sorted: itself, a glob's matches, or a directory's `*.jsonl` files.

    Raises StorageError when a glob or directory matches nothing.
    """
    if is_gcs(uri):
        return _expand_gcs(uri)
    path = Path(uri).expanduser()
    if has_glob(uri):
        matches = sorted(p for p in glob.glob(str(path), recursive=True) if Path(p).is_file())
        if not matches:
            raise StorageError(uri, "no file matches this pattern")
        return matches
    if path.is_dir():
        matches = sorted(str(p) for p in path.glob("*.jsonl"))
        if not matches:
            raise StorageError(uri, "directory holds no *.jsonl file")
        return matches
    return [str(path)]


def _expand_gcs(uri: str) -> list[str]:
    location = GcsPath.parse(uri)
    if not has_glob(uri) and not uri.endswith("/"):
        return [uri]
    pattern = location.name + ("*.jsonl" if uri.endswith("/") else "")
    prefix = _GLOB_CHARS.split(pattern, maxsplit=1)[0]
    names = _gcs_call(uri, lambda: [b.name for b in gcs_client().list_blobs(location.bucket, prefix=prefix,
                                                                             retry=_retry())])
    regex = _gcs_glob_regex(pattern)
    matches = sorted(f"{GCS_PREFIX}{location.bucket}/{n}" for n in names if regex.fullmatch(n))
    if not matches:
        raise StorageError(uri, "no object matches this pattern")
    return matches


def _gcs_glob_regex(pattern: str) -> re.Pattern:
    """Glob semantics as gsutil has them: `*` and `?` stay within one folder, `**` crosses folders."""
    out, i = [], 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
        elif pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif pattern[i] == "*":
            out.append("[^/]*")
            i += 1
        elif pattern[i] == "?":
            out.append("[^/]")
            i += 1
        elif pattern[i] == "[" and "]" in pattern[i + 2:]:
            end = pattern.index("]", i + 2)
            body = pattern[i + 1:end]
            out.append("[" + ("^" + body[1:] if body.startswith("!") else body) + "]")
            i = end + 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    return re.compile("".join(out), re.DOTALL)


def read_bytes(uri: str) -> bytes:
    if is_gcs(uri):
        location = GcsPath.parse(uri)
        return _gcs_call(uri, lambda: gcs_client().bucket(location.bucket).blob(location.name)
                         .download_as_bytes(retry=_retry()))
    path = Path(uri).expanduser()
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise StorageError(uri, "file not found") from None
    except IsADirectoryError:
        raise StorageError(uri, "is a directory, not a file") from None
    except PermissionError:
        raise StorageError(uri, "permission denied") from None
    except OSError as error:
        raise StorageError(uri, f"cannot read: {error.strerror}") from None


def write_bytes(uri: str, data: bytes) -> None:
    """Write a whole file; local writes go through a temporary file so a reader never sees half of it."""
    if is_gcs(uri):
        location = GcsPath.parse(uri)
        _gcs_call(uri, lambda: gcs_client().bucket(location.bucket).blob(location.name).upload_from_string(data))
        return
    path = Path(uri).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial")
    partial.write_bytes(data)
    os.replace(partial, path)


def download_directory(uri: str, destination: Path) -> list[Path]:
    """Copy every object under a gs:// prefix into `destination`, keeping relative paths."""
    location = GcsPath.parse(uri.rstrip("/") + "/")
    client = gcs_client()
    blobs = _gcs_call(uri, lambda: list(client.list_blobs(location.bucket, prefix=location.name,
                                                          retry=_retry())))
    files = [b for b in blobs if not b.name.endswith("/")]
    if not files:
        raise StorageError(uri, "no object under this prefix")
    written = []
    for blob in files:
        target = destination / blob.name[len(location.name):]
        target.parent.mkdir(parents=True, exist_ok=True)
        _gcs_call(f"{GCS_PREFIX}{location.bucket}/{blob.name}",
                  lambda blob=blob, target=target: blob.download_to_filename(str(target), retry=_retry()))
        written.append(target)
    return written


def bucket_exists(uri: str) -> bool:
    """Whether the bucket of a gs:// URI exists (and these credentials may see it)."""
    bucket = GcsPath.parse(uri).bucket
    return _gcs_call(uri, lambda: gcs_client().bucket(bucket).exists(retry=_retry()))
