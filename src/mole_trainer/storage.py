"""Storage by URL (fsspec): local paths, file://, s3:// (s3fs), gs:// (gcsfs), memory://, ...

Credentials come from each backend's own environment or profile (AWS_* / AWS_ENDPOINT_URL for S3 and
S3-compatible stores, GOOGLE_APPLICATION_CREDENTIALS for GCS); a URL that carries them inline is
redacted (``redact``) wherever mole prints or records it.
"""

from __future__ import annotations

import re

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
# values of query parameters that carry secrets (pre-signed URLs, SAS tokens)
_SECRET_QUERY = re.compile(
    r"(?P<key>[?&](?:[\w.-]*(?:signature|sig|token|secret|password|credential|key)[\w.-]*))=(?P<value>[^&#\s]+)",
    re.IGNORECASE,
)


def redact(text: str) -> str:
    """``text`` with credentials embedded in URLs replaced by ***: user:pass@, token@, secret query values."""
    text = _USERINFO.sub(lambda m: f"{m['scheme']}{REDACTED}@", str(text))
    return _SECRET_QUERY.sub(lambda m: f"{m['key']}={REDACTED}", text)


def open_fs(url: str):
    """(fsspec filesystem, path) for a URL or local path; a missing protocol package is a UserError.

    Listings cached by an earlier call are dropped: another process may have written since.
    """
    import fsspec

    shown = redact(url)
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


def is_local(fs) -> bool:
    """Whether an fsspec filesystem is this machine's own (renames are atomic there)."""
    from fsspec.implementations.local import LocalFileSystem

    return isinstance(fs, LocalFileSystem)
