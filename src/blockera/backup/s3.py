"""A repository in an S3 bucket, in restic's S3 layout (docs/backup-repository.md §1.2).

    <prefix>/config                 the encrypted config
    <prefix>/keys/<id>              key files
    <prefix>/locks/<id>             lock files
    <prefix>/snapshots/<id>         snapshot files
    <prefix>/index/<id>             index files
    <prefix>/data/<id[:2]>/<id>     pack files

(no prefix: the same names at the top of the bucket), so `restic -r s3:...` and blockera open
each other's repositories. Locations are spelled as restic spells them: `s3:http://host:port/
bucket/prefix`, `s3:https://...`, and `s3:host/bucket/prefix` (HTTPS).

This module owns the S3 client too: a small one on urllib3 with its own AWS Signature V4
(measured against boto3 and obstore, see the document), credentials from the environment or a
profile (botocore's credential chain), one connection pool of `connections` shared by all
threads, retries with exponential backoff, bandwidth limits, and errors a user can act on
(`S3Error` and its subclasses, all `BackendError`s).

Saves are single PUTs, atomic for readers, sent with `If-None-Match: *`: an object that is
already there is never replaced; if its content is the same (a retried save whose first
answer was lost), the save succeeds, otherwise it fails with `S3ObjectExistsError`.
"""

from __future__ import annotations

import email.utils
import hashlib
import hmac
import logging
import os
import posixpath
import random
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from urllib.parse import quote, unquote_plus, urlsplit

import urllib3

from blockera.backup.backend import Backend, Buffer, FileInfo, FileType
from blockera.backup.errors import BackendError, BackendNotFoundError

log = logging.getLogger(__name__)

DEFAULT_CONNECTIONS = 5
"""Concurrent requests, as restic's `-o s3.connections` default."""
DEFAULT_REGION = "us-east-1"
DEFAULT_RETRIES = 8
DEFAULT_CONNECT_TIMEOUT_S = 10.0
DEFAULT_READ_TIMEOUT_S = 60.0
MAX_SKEW_S = 15 * 60
"""S3 refuses requests signed more than 15 minutes away from its own clock."""

_EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()
_IO_CHUNK_BYTES = 256 << 10
_RETRY_STATUS = frozenset({500, 502, 503, 504, 429})
_RETRY_CODES = frozenset({"SlowDown", "InternalError", "RequestTimeout", "ServiceUnavailable",
                          "Throttling", "ThrottlingException"})
_CREDENTIAL_CODES = frozenset({"InvalidAccessKeyId", "SignatureDoesNotMatch",
                               "InvalidSecurity", "InvalidToken", "ExpiredToken",
                               "TokenRefreshRequired"})


# -- errors -------------------------------------------------------------------------------

class S3Error(BackendError):
    """An S3 request failed. `code` is S3's error code (e.g. `AccessDenied`) when the server
    gave one, `status` the HTTP status (0 when no answer came)."""

    def __init__(self, message: str, *, code: str = "", status: int = 0,
                 errno_name: str | None = None) -> None:
        super().__init__(message, errno_name=errno_name)
        self.code = code
        self.status = status


class S3CredentialsError(S3Error):
    """No credentials were found, or the server does not accept them (unknown access key ID,
    wrong secret key, expired token)."""

    errno_name = "EACCES"


class S3AccessDeniedError(S3Error):
    """The credentials are valid but lack a permission on the bucket (e.g. a read-only user
    saving a file)."""

    errno_name = "EACCES"


class S3BucketNotFoundError(S3Error):
    """The bucket does not exist."""

    errno_name = "ENOENT"


class S3ClockSkewError(S3Error):
    """The server refused our signature's time: this machine's clock is off."""

    errno_name = "ETIME"


class S3ConnectionError(S3Error):
    """The endpoint could not be reached or kept failing (after every retry)."""

    errno_name = "EHOSTUNREACH"


class S3ObjectExistsError(S3Error):
    """A save found an object with different content under the same name."""

    errno_name = "EEXIST"


# -- locations ----------------------------------------------------------------------------

@dataclass(frozen=True)
class S3Location:
    """Where a repository lives: endpoint, bucket and prefix (`""` for the bucket's top)."""

    scheme: str      # "http" or "https"
    host: str        # host or host:port, as written
    bucket: str
    prefix: str

    @classmethod
    def parse(cls, url: str) -> "S3Location":
        """restic's S3 repository syntax: `s3:http://host:port/bucket/prefix`,
        `s3:https://host/bucket/prefix`, `s3:host/bucket/prefix` and `s3://host/bucket/prefix`
        (HTTPS for both); the prefix is optional."""
        if url.startswith("s3:http"):
            parts = urlsplit(url[3:])
            if parts.scheme not in ("http", "https") or not parts.netloc:
                raise ValueError(f"{url}: invalid S3 URL; expected s3:http://host:port/bucket"
                                 "[/prefix] or s3:https://host/bucket[/prefix]")
            if parts.path in ("", "/"):
                raise ValueError(f"{url}: no bucket name after the host; expected "
                                 f"s3:{parts.scheme}://{parts.netloc}/bucket[/prefix]")
            scheme, host, rest = parts.scheme, parts.netloc, parts.path[1:]
        elif url.startswith("s3:"):
            body = url[5:] if url.startswith("s3://") else url[3:]
            if "://" in body:
                raise ValueError(f"{url}: unknown scheme; expected s3:host/bucket[/prefix] "
                                 "(HTTPS), s3:http://host:port/bucket[/prefix] or "
                                 "s3:https://...")
            host, _, rest = body.partition("/")
            scheme = "https"
            if not host or not rest:
                raise ValueError(f"{url}: expected s3:host/bucket[/prefix] (HTTPS), or "
                                 "s3:http://host:port/bucket[/prefix]")
        else:
            raise ValueError(f"{url}: not an S3 location (it must start with s3:)")
        bucket, _, prefix = rest.partition("/")
        if not bucket:
            raise ValueError(f"{url}: empty bucket name")
        if prefix:
            prefix = posixpath.normpath(prefix)
            if prefix == ".":
                prefix = ""
        return cls(scheme, host.lower(), bucket, prefix)

    @property
    def url(self) -> str:
        """The location as restic spells it (always with the scheme)."""
        tail = f"/{self.prefix}" if self.prefix else ""
        return f"s3:{self.scheme}://{self.host}/{self.bucket}{tail}"

    def key(self, ftype: FileType, name: str) -> str:
        """The object key of a repository file (restic's default layout)."""
        if ftype is FileType.CONFIG:
            rel = "config"
        elif ftype is FileType.PACK:
            rel = f"data/{name[:2]}/{name}"
        else:
            rel = f"{ftype.value}/{name}"
        return f"{self.prefix}/{rel}" if self.prefix else rel

    def dir_prefix(self, ftype: FileType) -> str:
        """The key prefix under which every file of `ftype` lies (ends with a slash)."""
        return f"{self.prefix}/{ftype.value}/" if self.prefix else f"{ftype.value}/"


# -- credentials and signatures ------------------------------------------------------------

@dataclass(frozen=True)
class Credentials:
    access_key_id: str
    secret_access_key: str
    session_token: str | None = None


class _CredentialSource:
    """Static credentials, or botocore's chain (profile, SSO, web identity, instance role),
    which refreshes temporary credentials by itself."""

    def __init__(self, static: Credentials | None, profile: str | None) -> None:
        self._static = static
        self._profile = profile
        self._botocore: object | None = None
        self._lock = threading.Lock()

    def get(self) -> Credentials:
        if self._static is not None:
            return self._static
        with self._lock:
            if self._botocore is None:
                self._botocore = self._resolve()
        frozen = self._botocore.get_frozen_credentials()  # type: ignore[attr-defined]
        return Credentials(frozen.access_key, frozen.secret_key, frozen.token)

    def _resolve(self) -> object:
        try:
            import botocore.exceptions
            import botocore.session
        except ImportError:  # pragma: no cover - botocore is a dependency
            raise S3CredentialsError("no S3 credentials: set AWS_ACCESS_KEY_ID and "
                                     "AWS_SECRET_ACCESS_KEY (profiles need botocore)") from None
        try:
            session = botocore.session.Session(profile=self._profile)
            creds = session.get_credentials()
        except botocore.exceptions.ProfileNotFound as exc:
            raise S3CredentialsError(f"S3 credentials: {exc}; check AWS_PROFILE and "
                                     "~/.aws/credentials") from None
        except botocore.exceptions.BotoCoreError as exc:
            raise S3CredentialsError(f"S3 credentials could not be loaded: {exc}") from None
        if creds is None:
            where = f"profile {self._profile!r}" if self._profile else "the environment"
            raise S3CredentialsError(f"no S3 credentials found in {where}: set "
                                     "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or "
                                     "AWS_PROFILE to a profile in ~/.aws/credentials")
        return creds


def _quote_path(path: str) -> str:
    return quote(path, safe="/-_.~")


def _canonical_query(query: list[tuple[str, str]]) -> str:
    pairs = sorted((quote(k, safe="-_.~"), quote(v, safe="-_.~")) for k, v in query)
    return "&".join(f"{k}={v}" for k, v in pairs)


class SigV4Signer:
    """AWS Signature Version 4 for S3 (header authorisation, the payload's SHA-256 signed).
    The signing key is cached per day."""

    def __init__(self, region: str) -> None:
        self.region = region
        self._cache: tuple[str, str, bytes] | None = None

    def _signing_key(self, secret: str, datestamp: str) -> bytes:
        cached = self._cache
        if cached is not None and cached[0] == secret and cached[1] == datestamp:
            return cached[2]
        key = f"AWS4{secret}".encode()
        for part in (datestamp, self.region, "s3", "aws4_request"):
            key = hmac.new(key, part.encode(), hashlib.sha256).digest()
        self._cache = (secret, datestamp, key)
        return key

    def sign(self, method: str, host: str, path: str, query: list[tuple[str, str]],
             headers: dict[str, str], payload_sha256: str, creds: Credentials,
             now_s: float) -> dict[str, str]:
        """`headers` plus Host, X-Amz-Date, X-Amz-Content-SHA256, the session token and
        Authorization. `path` is the URI-encoded path."""
        amz_date = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(now_s))
        datestamp = amz_date[:8]
        out = dict(headers)
        out["Host"] = host
        out["X-Amz-Date"] = amz_date
        out["X-Amz-Content-SHA256"] = payload_sha256
        if creds.session_token:
            out["X-Amz-Security-Token"] = creds.session_token
        canon = sorted((k.lower(), " ".join(str(v).split())) for k, v in out.items())
        signed = ";".join(k for k, _ in canon)
        request = "\n".join([method, path, _canonical_query(query),
                             "".join(f"{k}:{v}\n" for k, v in canon), signed, payload_sha256])
        scope = f"{datestamp}/{self.region}/s3/aws4_request"
        to_sign = "\n".join(["AWS4-HMAC-SHA256", amz_date, scope,
                             hashlib.sha256(request.encode()).hexdigest()])
        signature = hmac.new(self._signing_key(creds.secret_access_key, datestamp),
                             to_sign.encode(), hashlib.sha256).hexdigest()
        out["Authorization"] = (f"AWS4-HMAC-SHA256 Credential={creds.access_key_id}/{scope}, "
                                f"SignedHeaders={signed}, Signature={signature}")
        return out


# -- bandwidth ----------------------------------------------------------------------------

class RateLimiter:
    """A byte budget per second shared by every thread (one per direction, like restic's
    --limit-upload/--limit-download): each `take(n)` books n bytes after the ones booked
    before it and sleeps until they are due, less a burst of a tenth of a second."""

    def __init__(self, bytes_per_s: float) -> None:
        if bytes_per_s <= 0:
            raise ValueError("a bandwidth limit must be positive")
        self.bytes_per_s = bytes_per_s
        self._due = time.monotonic()
        self._lock = threading.Lock()

    def take(self, n_bytes: int) -> None:
        with self._lock:
            now = time.monotonic()
            self._due = max(self._due, now) + n_bytes / self.bytes_per_s
            wait = self._due - now - 0.1
        if wait > 0:
            time.sleep(wait)


def _limited_chunks(view: memoryview, limiter: RateLimiter) -> Iterator[memoryview]:
    for start in range(0, len(view), _IO_CHUNK_BYTES):
        piece = view[start:start + _IO_CHUNK_BYTES]
        limiter.take(len(piece))
        yield piece


# -- responses ----------------------------------------------------------------------------

@dataclass
class _Response:
    status: int
    headers: dict[str, str]     # lower-case names
    body: bytes
    code: str = ""              # S3 error code, from the XML body
    message: str = ""

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300


def _parse_error(body: bytes) -> tuple[str, str]:
    if not body.lstrip().startswith(b"<"):
        return "", ""
    try:
        root = ET.fromstring(body)
    except ET.ParseError:
        return "", ""
    code = root.findtext("Code") or ""
    message = root.findtext("Message") or ""
    return code.strip(), message.strip()


class _Retry(Exception):
    """Internal: an attempt failed in a way worth retrying."""

    def __init__(self, reason: str, response: _Response | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.response = response


# -- the backend --------------------------------------------------------------------------

class S3Backend(Backend):
    """A repository in an S3 bucket (any S3-compatible server), thread-safe: at most
    `connections` requests run at once, the others wait for a connection."""

    def __init__(self, location: S3Location, *, credentials: Credentials | None = None,
                 profile: str | None = None, region: str | None = None,
                 connections: int = DEFAULT_CONNECTIONS,
                 cacert: str | os.PathLike[str] | None = None,
                 limit_upload_kib: float | None = None, limit_download_kib: float | None = None,
                 retries: int = DEFAULT_RETRIES, backoff_initial_s: float = 0.2,
                 backoff_max_s: float = 10.0,
                 connect_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S,
                 read_timeout_s: float = DEFAULT_READ_TIMEOUT_S,
                 bucket_lookup: str = "auto") -> None:
        """Use `from_url` unless the parts are at hand. `credentials`: explicit keys (else
        botocore's chain with `profile`); `region`: for the signature (default
        AWS_DEFAULT_REGION, AWS_REGION, or us-east-1; a region given in an AWS error is
        followed); `cacert`: a PEM file of CA certificates to trust instead of the system's;
        `limit_*_kib`: KiB/s over all connections; `retries`: further attempts after a
        throttled, failed (5xx) or dropped request, waiting `backoff_initial_s` doubling up to
        `backoff_max_s` (with jitter); `bucket_lookup`: "path" (`host/bucket/key`), "dns"
        (`bucket.host/key`) or "auto" (dns for amazonaws.com, path elsewhere)."""
        if connections < 1:
            raise ValueError("connections must be at least 1")
        if bucket_lookup not in ("auto", "path", "dns"):
            raise ValueError(f"bucket_lookup must be auto, path or dns, not {bucket_lookup!r}")
        self.loc = location
        self.connections = connections
        self.retries = retries
        self.backoff_initial_s = backoff_initial_s
        self.backoff_max_s = backoff_max_s
        self.region = region or os.environ.get("AWS_DEFAULT_REGION") or \
            os.environ.get("AWS_REGION") or _region_from_host(location.host) or DEFAULT_REGION
        self._signer = SigV4Signer(self.region)
        self._credentials = _CredentialSource(credentials, profile)
        self.clock: Callable[[], float] = time.time
        """The time put into signatures (replaceable for tests of clock skew)."""
        self._upload_limit = RateLimiter(limit_upload_kib * 1024) if limit_upload_kib else None
        self._download_limit = \
            RateLimiter(limit_download_kib * 1024) if limit_download_kib else None
        dns = bucket_lookup == "dns" or (bucket_lookup == "auto" and
                                         location.host.endswith("amazonaws.com") and
                                         "." not in location.bucket)
        host = location.host
        default_port = ":443" if location.scheme == "https" else ":80"
        if host.endswith(default_port):
            host = host[:-len(default_port)]
        self._host = f"{location.bucket}.{host}" if dns else host
        self._path_base = "/" if dns else f"/{_quote_path(location.bucket)}/"
        timeout = urllib3.Timeout(connect=connect_timeout_s, read=read_timeout_s)
        pool_args: dict[str, object] = {"maxsize": connections, "block": True,
                                        "timeout": timeout, "retries": False}
        if location.scheme == "https":
            pool_args["cert_reqs"] = "CERT_REQUIRED"
            if cacert is not None:
                pool_args["ca_certs"] = os.fspath(cacert)
        self._pool = urllib3.connection_from_url(f"{location.scheme}://{self._host}",
                                                 **pool_args)
        self._conditional_put = True
        self._bucket_checked = False

    @classmethod
    def from_url(cls, url: str, *, connections: int = DEFAULT_CONNECTIONS,
                 cacert: str | os.PathLike[str] | None = None,
                 limit_upload_kib: float | None = None,
                 limit_download_kib: float | None = None,
                 access_key_id: str | None = None, secret_access_key: str | None = None,
                 session_token: str | None = None, profile: str | None = None,
                 region: str | None = None, **options: object) -> "S3Backend":
        """A backend for a restic S3 location (`s3:http://host:port/bucket/prefix`,
        `s3:https://...`, `s3:host/bucket/prefix`). Credentials: the keys given, else
        AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (and AWS_SESSION_TOKEN), else the profile
        given or AWS_PROFILE (botocore's chain: ~/.aws/credentials, ~/.aws/config, SSO,
        instance roles). The other options are the constructor's. Nothing is sent until the
        first operation."""
        location = S3Location.parse(url)
        if access_key_id is None and secret_access_key is None and profile is None:
            access_key_id = os.environ.get("AWS_ACCESS_KEY_ID") or None
            secret_access_key = os.environ.get("AWS_SECRET_ACCESS_KEY") or None
            session_token = session_token or os.environ.get("AWS_SESSION_TOKEN") or None
        static = None
        if access_key_id is not None or secret_access_key is not None:
            if not access_key_id or not secret_access_key:
                raise S3CredentialsError(f"{location.url}: S3 credentials need both an access "
                                         "key ID and a secret access key (AWS_ACCESS_KEY_ID "
                                         "and AWS_SECRET_ACCESS_KEY)")
            static = Credentials(access_key_id, secret_access_key, session_token)
        return cls(location, credentials=static, profile=profile, region=region,
                   connections=connections, cacert=cacert, limit_upload_kib=limit_upload_kib,
                   limit_download_kib=limit_download_kib, **options)  # type: ignore[arg-type]

    @property
    def location(self) -> str:
        return self.loc.url

    def __repr__(self) -> str:
        return f"S3Backend({self.loc.url!r})"

    def close(self) -> None:
        self._pool.close()

    # -- requests --------------------------------------------------------------------------

    def _path(self, key: str) -> str:
        return self._path_base + _quote_path(key)

    def _once(self, method: str, path: str, query: list[tuple[str, str]],
              headers: dict[str, str], body: memoryview | None, payload_sha256: str,
              limiter_down: bool) -> _Response:
        """One attempt. Raises `_Retry` for what deserves another, `S3Error` for what not."""
        creds = self._credentials.get()
        signed = self._signer.sign(method, self._host, path, query, headers, payload_sha256,
                                   creds, self.clock())
        url = path + ("?" + _canonical_query(query) if query else "")
        send: object = None
        if body is not None:
            signed["Content-Length"] = str(len(body))
            send = _limited_chunks(body, self._upload_limit) if self._upload_limit else body
        try:
            resp = self._pool.urlopen(method, url, body=send, headers=signed, redirect=False,
                                      assert_same_host=False, preload_content=False,
                                      pool_timeout=None, release_conn=False)
        except urllib3.exceptions.SSLError as exc:
            reason = _reason(exc)
            if "CERTIFICATE_VERIFY_FAILED" in reason or "certificate" in reason.lower():
                hint = ("the server's certificate is not trusted; if it is signed by a "
                        "private CA, pass that CA's certificate (PEM) as cacert")
            else:
                hint = ("is the endpoint serving HTTPS? For plain HTTP write "
                        f"s3:http://{self.loc.host}/...")
            raise S3ConnectionError(f"{self.location}: TLS with {self._host} failed "
                                    f"({reason}): {hint}") from None
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            raise _Retry(_reason(exc)) from None
        try:
            try:
                if method == "HEAD":
                    data = b""
                elif limiter_down and self._download_limit is not None and resp.status < 300:
                    parts = []
                    while True:
                        piece = resp.read(_IO_CHUNK_BYTES)
                        if not piece:
                            break
                        self._download_limit.take(len(piece))
                        parts.append(piece)
                    data = b"".join(parts)
                else:
                    data = resp.read()
            except (urllib3.exceptions.HTTPError, OSError) as exc:
                resp.close()
                raise _Retry(f"reading the answer: {_reason(exc)}") from None
        finally:
            resp.release_conn()
        hdrs = {k.lower(): v for k, v in resp.headers.items()}
        if resp.status in (200, 206) and "content-length" not in hdrs and \
                "chunked" not in hdrs.get("transfer-encoding", "").lower():
            # S3 always frames its answers; without a length or chunks, the header block was
            # cut short (and a body read to the end of the connection may be too).
            raise _Retry("incomplete answer (neither Content-Length nor chunks)")
        out = _Response(resp.status, hdrs, data)
        if not out.ok:
            out.code, out.message = _parse_error(data)
            if not out.code:
                out.code = hdrs.get("x-amz-error-code", "")
        if out.status in _RETRY_STATUS or out.code in _RETRY_CODES:
            raise _Retry(f"HTTP {out.status} {out.code or ''}".strip(), out)
        region = hdrs.get("x-amz-bucket-region") or (_parse_region(data) if not out.ok else "")
        if out.status in (301, 400) and region and region != self._signer.region:
            log.info("%s: the bucket is in region %s, not %s; following", self.location,
                     region, self._signer.region)
            self._signer = SigV4Signer(region)
            self.region = region
            raise _Retry(f"bucket region is {region}", out)
        return out

    def _request(self, method: str, key: str | None, *, what: str,
                 query: list[tuple[str, str]] | None = None,
                 headers: dict[str, str] | None = None, body: memoryview | None = None,
                 payload_sha256: str = _EMPTY_SHA256, download: bool = False) -> _Response:
        """A request with retries; the final answer (any status), or `S3Error` when every
        attempt failed to get an answer worth returning."""
        path = self._path(key) if key is not None else (self._path_base.rstrip("/") or "/")
        attempt = 0
        while True:
            try:
                return self._once(method, path, query or [], headers or {}, body,
                                  payload_sha256, download)
            except _Retry as exc:
                if attempt >= self.retries:
                    raise self._gave_up(what, exc, attempt + 1) from None
                delay = min(self.backoff_max_s, self.backoff_initial_s * 2 ** attempt)
                delay *= random.uniform(0.5, 1.0)
                log.warning("%s: %s: %s; retrying in %.1f s", self.location, what, exc.reason,
                            delay)
                time.sleep(delay)
                attempt += 1

    def _gave_up(self, what: str, exc: _Retry, attempts: int) -> S3Error:
        resp = exc.response
        if resp is None:
            return S3ConnectionError(
                f"{self.location}: {what}: cannot reach {self.loc.scheme}://{self._host} "
                f"({exc.reason}; {attempts} attempts). Check the URL and that the S3 server is "
                "running and reachable")
        if resp.code == "SlowDown" or resp.status in (429, 503):
            return S3ConnectionError(
                f"{self.location}: {what}: the server kept asking to slow down (HTTP "
                f"{resp.status} {resp.code}) for {attempts} attempts; try fewer connections or "
                "later", code=resp.code, status=resp.status)
        return S3ConnectionError(
            f"{self.location}: {what}: the server kept failing (HTTP {resp.status} "
            f"{resp.code} {resp.message}; {attempts} attempts)".rstrip(),
            code=resp.code, status=resp.status)

    def _error(self, resp: _Response, what: str) -> BackendError:
        """The exception for a final non-2xx answer."""
        code, status = resp.code, resp.status
        detail = f"HTTP {status}" + (f" {code}" if code else "") + \
            (f": {resp.message}" if resp.message else "")
        where = f"{self.location}: {what}"
        if code == "RequestTimeTooSkewed":
            return S3ClockSkewError(f"{where}: the server refused the request because this "
                                    f"machine's clock is wrong: {self._skew_text(resp)}. S3 "
                                    f"accepts {MAX_SKEW_S // 60} minutes of difference; set "
                                    "the clock (e.g. enable NTP) and try again",
                                    code=code, status=status)
        if code == "InvalidAccessKeyId":
            return S3CredentialsError(
                f"{where}: the server does not know the access key ID "
                f"{self._credentials.get().access_key_id!r} ({detail}); check "
                "AWS_ACCESS_KEY_ID (or the profile)", code=code, status=status)
        if code == "SignatureDoesNotMatch":
            return S3CredentialsError(
                f"{where}: the signature does not match ({detail}): the secret key does not "
                f"belong to access key ID {self._credentials.get().access_key_id!r}; check "
                "AWS_SECRET_ACCESS_KEY (or the profile)", code=code, status=status)
        if code in _CREDENTIAL_CODES:
            return S3CredentialsError(f"{where}: the credentials were refused ({detail}); "
                                      "check or renew them", code=code, status=status)
        if code == "NoSuchBucket":
            return self._no_bucket(what)
        if code == "AccessDenied" or status == 403:
            return S3AccessDeniedError(
                f"{where}: access denied ({detail}): the user with access key ID "
                f"{self._credentials.get().access_key_id!r} lacks the permission for this on "
                f"bucket {self.loc.bucket!r} (a read-only user or a bucket policy?); reading "
                "needs s3:GetObject and s3:ListBucket, writing also s3:PutObject and "
                "s3:DeleteObject (for locks)", code=code or "AccessDenied", status=status)
        if status == 404:
            return BackendNotFoundError(f"{where}: no such file")
        return S3Error(f"{where}: {detail}", code=code, status=status)

    def _no_bucket(self, what: str) -> S3BucketNotFoundError:
        return S3BucketNotFoundError(
            f"{self.location}: {what}: the bucket {self.loc.bucket!r} does not exist on "
            f"{self.loc.scheme}://{self.loc.host}; check the bucket name, or create the "
            "repository (init creates the bucket)", code="NoSuchBucket", status=404)

    def _skew_text(self, resp: _Response) -> str:
        server = resp.headers.get("date")
        ours = self.clock()
        if server:
            try:
                server_s = email.utils.parsedate_to_datetime(server).timestamp()
            except (TypeError, ValueError):
                server_s = None
            if server_s is not None:
                diff = ours - server_s
                side = "ahead of" if diff > 0 else "behind"
                return (f"the request was signed at {_utc(ours)}, {abs(diff):.0f} s {side} "
                        f"the server's time ({server})")
        return f"the request was signed at {_utc(ours)}"

    def _explain(self, resp: _Response, key: str, what: str) -> BackendError:
        """HEAD answers carry no error body: ask again with a one-byte GET to learn why."""
        if resp.code or resp.status in (404,):
            return self._error(resp, what)
        again = self._request("GET", key, what=what, headers={"Range": "bytes=0-0"})
        if again.ok:
            return S3Error(f"{self.location}: {what}: HTTP {resp.status}", status=resp.status)
        return self._error(again, what)

    # -- the bucket --------------------------------------------------------------------------

    def _bucket_status(self) -> int:
        resp = self._request("HEAD", None, what=f"looking up bucket {self.loc.bucket!r}")
        if resp.status in (200, 404):
            return resp.status
        if resp.status == 403:
            again = self._request("GET", None, what=f"looking up bucket {self.loc.bucket!r}",
                                  query=[("list-type", "2"), ("max-keys", "1")])
            if again.ok:
                return 200
            if again.code == "AccessDenied" or (again.status == 403 and not again.code):
                return 403
            raise self._error(again, f"looking up bucket {self.loc.bucket!r}")
        raise self._error(resp, f"looking up bucket {self.loc.bucket!r}")

    def _check_bucket(self, what: str) -> None:
        """After a 404 without details: is it the bucket that is missing?"""
        if self._bucket_checked:
            return
        if self._bucket_status() == 404:
            raise self._no_bucket(what)
        self._bucket_checked = True

    def create(self) -> None:
        """Create the bucket if it is not there (as restic's init does), and refuse a
        location that already holds a repository."""
        status = self._bucket_status()
        if status == 404:
            body = b""
            if self.region != DEFAULT_REGION and self.loc.host.endswith("amazonaws.com"):
                body = (b'<CreateBucketConfiguration xmlns="http://s3.amazonaws.com/doc/'
                        b'2006-03-01/"><LocationConstraint>' + self.region.encode() +
                        b"</LocationConstraint></CreateBucketConfiguration>")
            resp = self._request("PUT", None, what=f"creating bucket {self.loc.bucket!r}",
                                 body=memoryview(body),
                                 payload_sha256=hashlib.sha256(body).hexdigest())
            if not resp.ok and resp.code != "BucketAlreadyOwnedByYou":
                if resp.code == "BucketAlreadyExists":
                    raise S3Error(f"{self.location}: the bucket name {self.loc.bucket!r} is "
                                  "taken by another account; choose another",
                                  code=resp.code, status=resp.status)
                raise self._error(resp, f"creating bucket {self.loc.bucket!r}")
            log.info("%s: created bucket %s", self.location, self.loc.bucket)
        self._bucket_checked = True
        if self.exists(FileType.CONFIG, ""):
            raise BackendError(f"{self.location}: a repository already exists here (config "
                               "file present)")

    # -- files -------------------------------------------------------------------------------

    def _key(self, ftype: FileType, name: str) -> str:
        if ftype is not FileType.CONFIG:
            if not name or "/" in name or name.startswith("."):
                raise BackendError(f"{self.location}: invalid {ftype.value} file name {name!r}")
            if ftype is FileType.PACK and len(name) < 2:
                raise BackendError(f"{self.location}: invalid pack name {name!r}")
        return self.loc.key(ftype, name)

    def save(self, ftype: FileType, name: str, data: Buffer) -> None:
        key = self._key(ftype, name)
        view = memoryview(data).cast("B")
        sha = hashlib.sha256(view).hexdigest()
        what = f"saving {key}"
        headers = {"Content-Type": "application/octet-stream"}
        if self._conditional_put:
            headers["If-None-Match"] = "*"
        else:
            head = self._request("HEAD", key, what=what)
            if head.ok:
                self._check_same(key, view, what, head)
                return
        resp = self._request("PUT", key, what=what, headers=headers, body=view,
                             payload_sha256=sha)
        if resp.ok:
            return
        if resp.status == 412:
            self._check_same(key, view, what)
            return
        if resp.status == 501 and self._conditional_put:
            # The server cannot do conditional writes: look before every write instead.
            log.info("%s: the server does not support If-None-Match; checking before writes",
                     self.location)
            self._conditional_put = False
            self.save(ftype, name, data)
            return
        raise self._error(resp, what)

    def _check_same(self, key: str, view: memoryview, what: str,
                    head: _Response | None = None) -> None:
        """An object is already stored under `key`: fine if it holds these bytes (a save
        retried after its answer was lost), an error otherwise."""
        if head is None:
            head = self._request("HEAD", key, what=what)
        if not head.ok:
            raise self._explain(head, key, what)
        size = int(head.headers.get("content-length", "-1"))
        etag = head.headers.get("etag", "").strip('"')
        md5 = hashlib.md5(view, usedforsecurity=False).hexdigest()
        if size == len(view) and (etag == md5 or
                                  ("-" in etag and self._same_content(key, view, what))):
            return
        raise S3ObjectExistsError(
            f"{self.location}: {what}: an object with different content ({size} bytes) is "
            "already stored under this name; refusing to replace it (repository files are "
            "content-addressed: the existing one may be damaged; check it with restic "
            "check --read-data)", code="PreconditionFailed", status=412)

    def _same_content(self, key: str, view: memoryview, what: str) -> bool:
        """Compare by reading (multipart ETags are not MD5s of the content)."""
        resp = self._request("GET", key, what=what, download=True)
        return resp.ok and resp.body == view

    def load(self, ftype: FileType, name: str, offset_bytes: int = 0,
             length_bytes: int | None = None) -> bytes:
        key = self._key(ftype, name)
        if offset_bytes < 0 or (length_bytes is not None and length_bytes < 0):
            raise BackendError(f"{self.location}: invalid range {offset_bytes}+{length_bytes} "
                               f"for {key}")
        what = f"reading {key}"
        if length_bytes == 0:
            size = self.stat(ftype, name).size_bytes
            if offset_bytes > size:
                raise BackendError(f"{self.location}: {key} is shorter than expected: wanted "
                                   f"0 bytes at offset {offset_bytes}, it has {size}")
            return b""
        headers = {}
        if length_bytes is not None:
            headers["Range"] = f"bytes={offset_bytes}-{offset_bytes + length_bytes - 1}"
        elif offset_bytes:
            headers["Range"] = f"bytes={offset_bytes}-"
        resp = self._request("GET", key, what=what, headers=headers, download=True)
        if resp.status == 416:
            raise BackendError(f"{self.location}: {key} is shorter than expected: wanted "
                               f"{length_bytes if length_bytes is not None else 'the rest'} "
                               f"bytes at offset {offset_bytes}, got 0")
        if not resp.ok:
            if resp.status == 404 and resp.code != "NoSuchBucket":
                self._check_bucket(what)
                raise BackendNotFoundError(f"{self.location}: reading {key}: no such file")
            raise self._error(resp, what)
        data = resp.body
        if resp.status == 200 and headers:  # the server ignored the range
            data = data[offset_bytes:]
            if length_bytes is not None:
                data = data[:length_bytes]
        if length_bytes is not None and len(data) != length_bytes:
            raise BackendError(f"{self.location}: {key} is shorter than expected: wanted "
                               f"{length_bytes} bytes at offset {offset_bytes}, got {len(data)}")
        return data

    def stat(self, ftype: FileType, name: str) -> FileInfo:
        key = self._key(ftype, name)
        what = f"looking up {key}"
        resp = self._request("HEAD", key, what=what)
        if resp.status == 404:
            self._check_bucket(what)
            raise BackendNotFoundError(f"{self.location}: looking up {key}: no such file")
        if not resp.ok:
            raise self._explain(resp, key, what)
        size = int(resp.headers.get("content-length", "0"))
        return FileInfo(name if ftype is not FileType.CONFIG else "config", size)

    def list(self, ftype: FileType) -> Iterator[FileInfo]:
        if ftype is FileType.CONFIG:
            if self.exists(FileType.CONFIG, ""):
                yield self.stat(FileType.CONFIG, "")
            return
        found = False
        for key, size in self._list_keys(self.loc.dir_prefix(ftype)):
            name = key.rsplit("/", 1)[-1]
            if name and not key.endswith("/"):
                found = True
                yield FileInfo(name, size)
        if ftype is FileType.KEY and not found:
            self._refuse_legacy_layout()

    def _list_keys(self, prefix: str) -> Iterator[tuple[str, int]]:
        """Every (key, size) under `prefix` (ListObjectsV2, a thousand per page)."""
        token = None
        what = f"listing {prefix}"
        while True:
            query = [("list-type", "2"), ("prefix", prefix), ("encoding-type", "url")]
            if token:
                query.append(("continuation-token", token))
            resp = self._request("GET", None, what=what, query=query)
            if not resp.ok:
                raise self._error(resp, what)
            self._bucket_checked = True
            try:
                root = ET.fromstring(resp.body)
            except ET.ParseError as exc:
                raise S3Error(f"{self.location}: {what}: the server's answer is not XML "
                              f"({exc})") from None
            ns = root.tag[:root.tag.index("}") + 1] if root.tag.startswith("{") else ""
            encoded = (root.findtext(f"{ns}EncodingType") or "").lower() == "url"
            for item in root.iter(f"{ns}Contents"):
                key = item.findtext(f"{ns}Key") or ""
                if encoded:
                    key = unquote_plus(key)
                yield key, int(item.findtext(f"{ns}Size") or 0)
            truncated = (root.findtext(f"{ns}IsTruncated") or "").lower() == "true"
            token = root.findtext(f"{ns}NextContinuationToken")
            if not truncated or not token:
                return

    def _refuse_legacy_layout(self) -> None:
        """restic's oldest S3 layout (key/, snapshot/, lock/) is not read: say so rather than
        'no key files'."""
        legacy = f"{self.loc.prefix}/key/" if self.loc.prefix else "key/"
        for _ in self._list_keys(legacy):
            raise BackendError(f"{self.location}: this repository uses restic's old S3 layout "
                               "(key/, snapshot/, lock/ instead of keys/, snapshots/, locks/); "
                               "convert it with `restic migrate s3_layout` first")

    def remove(self, ftype: FileType, name: str) -> None:
        key = self._key(ftype, name)
        what = f"removing {key}"
        head = self._request("HEAD", key, what=what)
        if head.status == 404:
            self._check_bucket(what)
            raise BackendNotFoundError(f"{self.location}: removing {key}: no such file")
        if not head.ok:
            raise self._explain(head, key, what)
        resp = self._request("DELETE", key, what=what)
        if not resp.ok and resp.status != 404:
            raise self._error(resp, what)


def _reason(exc: BaseException) -> str:
    """A short cause for a connection failure (urllib3 nests the interesting part)."""
    seen = exc
    for _ in range(4):
        inner = getattr(seen, "reason", None) or seen.__context__ or \
            (seen.args[-1] if seen.args and isinstance(seen.args[-1], BaseException) else None)
        if not isinstance(inner, BaseException):
            break
        seen = inner
    text = str(seen) or type(seen).__name__
    if isinstance(seen, ConnectionRefusedError) or "Connection refused" in text:
        return "connection refused"
    if isinstance(seen, (TimeoutError, urllib3.exceptions.TimeoutError)) or \
            "timed out" in text:
        return f"timed out ({text})"
    return text


def _utc(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(ts))


def _region_from_host(host: str) -> str | None:
    """The region an AWS endpoint names: s3.eu-west-1.amazonaws.com, s3-eu-west-1.amazonaws.com,
    s3.dualstack.eu-west-1.amazonaws.com (None for s3.amazonaws.com and other servers)."""
    parts = host.split(":")[0].split(".")
    if parts[-2:] != ["amazonaws", "com"] or len(parts) < 3:
        return None
    labels = [p for p in parts[:-2] if p not in ("s3", "dualstack", "s3-accelerate")]
    if parts[0].startswith("s3-") and parts[0] != "s3-accelerate":
        labels.insert(0, parts[0][3:])
    labels = [p for p in labels if not p.startswith("s3-") and p != "external-1"]
    return labels[0] if len(labels) == 1 else None


def _parse_region(body: bytes) -> str:
    """The <Region> an AWS error names (a request signed for the wrong region)."""
    if b"<Region>" not in body:
        return ""
    try:
        return (ET.fromstring(body).findtext("Region") or "").strip()
    except ET.ParseError:
        return ""
