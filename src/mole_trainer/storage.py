"""Storage by URL (fsspec): local paths, file://, s3:// (s3fs), gs:// (gcsfs), memory://, ...

Credentials come from each backend's own environment or profile (AWS_* / AWS_ENDPOINT_URL for S3 and
S3-compatible stores, GOOGLE_APPLICATION_CREDENTIALS for GCS). A URL that carries them inline
(scheme://user:secret@...) is refused by ``open_fs``; any text mole prints or records about a URL or
a storage error goes through ``redact``. ``storage_errors`` turns a backend's failure (fsspec, botocore,
aiohttp, gcsfs) into a UserError naming the URL and the operation.
"""

from __future__ import annotations

import re
from contextlib import contextmanager

from .errors import UserError

# protocol -> fsspec extra that installs its implementation
_FSSPEC_EXTRAS = {
    "s3": "s3",
    "s3a": "s3",
    "gs": "gcs",
    "gcs": "gcs",
    "az": "abfs",
    "abfs": "abfs",
    "abfss": "abfs",
}
REDACTED = "***"
# user:password@ (or token@) right after a scheme
_USERINFO = re.compile(r"(?P<scheme>\b[a-zA-Z][a-zA-Z0-9+.-]*://)(?P<userinfo>[^/@\s?#]+)@")
# user:password@ with no scheme, as backends echo a path (s3fs: 'Invalid bucket name "KEY:SECRET@bucket"')
_BARE_USERINFO = re.compile(r"(?<![\w.+%~:/-])[\w.+%~-]+:[^\s/@'\"]+@")
# protocols whose addresses hold a name that is no secret before @ (container@account, org:repo@ref)
_AT_IN_ADDRESS = {"abfs", "abfss", "az", "github", "git"}
# protocols where user@host is an address and only user:password@host carries a secret
_USER_AT_HOST = {"ssh", "sftp", "ftp"}
# values of query parameters that carry secrets (pre-signed URLs, SAS tokens)
_SECRET_QUERY = re.compile(
    r"(?P<key>[?&](?:[\w.-]*(?:signature|sig|token|secret|password|credential|key)[\w.-]*))=(?P<value>[^&#\s]+)",
    re.IGNORECASE,
)


def redact(text: str) -> str:
    """``text`` with credentials embedded in URLs replaced by ***: user:pass@, token@, secret query values."""
    text = _USERINFO.sub(lambda m: f"{m['scheme']}{REDACTED}@", str(text))
    text = _BARE_USERINFO.sub(f"{REDACTED}@", text)
    return _SECRET_QUERY.sub(lambda m: f"{m['key']}={REDACTED}", text)


def inline_credentials(url: str) -> bool:
    """Whether a URL carries credentials in its userinfo (s3://KEY:SECRET@bucket, https://u:p@host)."""
    for m in _USERINFO.finditer(str(url)):
        protocol = m["scheme"][:-3].lower()
        if protocol in _AT_IN_ADDRESS:
            continue
        if protocol not in _USER_AT_HOST or ":" in m["userinfo"]:
            return True
    return False


def open_fs(url: str):
    """(fsspec filesystem, path) for a URL or local path; a missing protocol package is a UserError.

    Listings cached by an earlier call are dropped: another process may have written since.
    """
    import fsspec

    shown = redact(url)
    if inline_credentials(url):
        raise UserError(
            f"{shown}: credentials in the URL are not accepted (the backend would not use them, and they "
            "would end up in logs); give them through the backend's environment or profile instead "
            "(S3: AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or AWS_PROFILE; GCS: "
            "GOOGLE_APPLICATION_CREDENTIALS)"
        )
    try:
        fs, path = fsspec.core.url_to_fs(str(url))
    except ImportError as exc:
        protocol = str(url).split("://", 1)[0]
        extra = _FSSPEC_EXTRAS.get(protocol)
        if extra == "s3":
            hint = "pip install 'mole-trainer[s3]'"
        elif extra:
            hint = f"pip install 'fsspec[{extra}]'"
        else:
            hint = f"install the fsspec implementation of {protocol}://"
        raise UserError(
            f"{shown}: {protocol}:// needs a package that is not installed ({exc}); {hint}"
        ) from exc
    except ValueError as exc:
        raise UserError(f"{shown}: {redact(str(exc))}") from exc
    fs.invalidate_cache()
    return fs, path.rstrip("/") or path


def unserialized_note(url: str) -> str | None:
    """The warning printed before changing a destination that is not a local folder: nothing there
    serializes writers (a local destination is locked), so concurrent changes can race."""
    if "://" not in str(url) or str(url).startswith("file://"):
        return None
    return (
        f"note: {redact(url)} is not a local folder: concurrent deploys, promotes, rollbacks and gc "
        "there are not serialized (no lock); run one at a time"
    )


def is_local(fs) -> bool:
    """Whether an fsspec filesystem is this machine's own (renames are atomic there)."""
    from fsspec.implementations.local import LocalFileSystem

    return isinstance(fs, LocalFileSystem)


def _backend_errors() -> tuple[type[BaseException], ...]:
    """Exception types of the storage backends that are installed (each import is optional)."""
    kinds: list[type[BaseException]] = [OSError]  # fsspec's own, local disks, timeouts
    try:
        from botocore.exceptions import BotoCoreError, ClientError

        kinds += [BotoCoreError, ClientError]
    except ImportError:
        pass
    try:
        from aiohttp import ClientError as AiohttpError

        kinds.append(AiohttpError)
    except ImportError:
        pass
    try:
        from gcsfs.retry import HttpError

        kinds.append(HttpError)
    except ImportError:
        pass
    try:
        from google.auth.exceptions import GoogleAuthError

        kinds.append(GoogleAuthError)
    except ImportError:
        pass
    return tuple(kinds)


@contextmanager
def storage_errors(url: str, operation: str, hint: str = ""):
    """Turn a storage backend's failure inside the block into a UserError naming the URL (redacted),
    the operation and the error (redacted); `hint` is appended (e.g. what was left unchanged)."""
    try:
        yield
    except UserError:
        raise
    except _backend_errors() as exc:
        message = f"{redact(url)}: {operation} failed: {type(exc).__name__}: {redact(str(exc))}"
        raise UserError(message + (f"; {hint}" if hint else "")) from exc
