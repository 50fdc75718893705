"""Where the model repository lives: models/ (local) or an S3 bucket (`repo=s3://BUCKET/PREFIX`),
and the one S3 client `doit publish` and `doit serve` use.

Credentials, region and endpoint come from boto3's usual sources: AWS_ACCESS_KEY_ID,
AWS_SECRET_ACCESS_KEY (AWS_SESSION_TOKEN), AWS_DEFAULT_REGION, AWS_ENDPOINT_URL (a self-hosted
S3 such as MinIO) or ~/.aws/config. boto3 is imported inside functions only: `doit list`
imports this module.

The published layout, read by any Triton server (ours, or a stock one polling the bucket):

    PREFIX/<model>/config.pbtxt      written last; its version_policy names the one version
                                     that is complete
    PREFIX/<model>/<version>/...     a new folder whenever the model's files change
    PREFIX/publish.json              the manifest, written after each model: what is
                                     published, with each file's sha256 (a file at the root,
                                     which Triton does not take for a model)
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from tasks import paths
from tasks.errors import BuildError

SCHEME = "s3://"
# Triton's own S3 path pattern (core/src/filesystem/implementations/s3.h): bucket names of
# lowercase letters, digits, '.' and '-'; prefix segments of letters, digits, '.', '-', '_'.
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_SEGMENT = re.compile(r"^[A-Za-z0-9._-]+$")
MANIFEST_NAME = "publish.json"
SHA256_METADATA = "sha256"  # x-amz-meta-sha256 of every file published
CONNECT_TIMEOUT = 5.0


class StorageError(BuildError):
    """The bucket cannot be reached, read or written; the message names the fix."""


@dataclass(frozen=True)
class S3Location:
    """s3://BUCKET/PREFIX: a model repository in a bucket."""

    bucket: str
    prefix: str  # without slashes at either end; "" for the bucket's root

    @classmethod
    def parse(cls, var: str, text: str) -> S3Location:
        rest = text[len(SCHEME) :]
        bucket, _, prefix = rest.partition("/")
        prefix = prefix.strip("/")
        if not _BUCKET.match(bucket) or ".." in bucket:
            raise StorageError(
                f"{var}={text}: '{bucket}' is not an S3 bucket name (3 to 63 lowercase letters, "
                f"digits, '.' and '-'); pass {var}=s3://BUCKET/PREFIX"
            )
        bad = [s for s in prefix.split("/") if prefix and not _SEGMENT.match(s)]
        if bad:
            raise StorageError(
                f"{var}={text}: Triton reads prefixes of letters, digits, '.', '-' and '_' "
                f"only, not '{bad[0]}'; pass {var}=s3://BUCKET/PREFIX"
            )
        return cls(bucket, prefix)

    def __str__(self) -> str:
        return f"{SCHEME}{self.bucket}/{self.prefix}".rstrip("/")

    def key(self, *parts: str) -> str:
        """The object key of a path below the prefix (model/version/file)."""
        return "/".join(p for p in (self.prefix, *parts) if p)

    @property
    def manifest_key(self) -> str:
        return self.key(MANIFEST_NAME)

    def triton_path(self, endpoint_url: str | None) -> str:
        """The repository as tritonserver 2.51 reads it: s3://bucket/prefix on AWS, and
        s3://host:port/bucket/prefix (https:// after s3:// for TLS) for a custom endpoint."""
        if not endpoint_url:
            return str(self)
        from urllib.parse import urlsplit

        url = urlsplit(endpoint_url)
        port = url.port or (443 if url.scheme == "https" else 80)
        tls = "https://" if url.scheme == "https" else ""
        return f"{SCHEME}{tls}{url.hostname}:{port}/{self.bucket}/{self.prefix}".rstrip("/")


def parse_repository(var: str, text: str) -> str:
    """repo=: a local folder, or s3://BUCKET/PREFIX (checked here); other schemes refused."""
    if text.startswith(SCHEME):
        S3Location.parse(var, text)
    elif "://" in text:
        raise StorageError(
            f"{var}={text}: only S3 is supported; pass {var}=s3://BUCKET/PREFIX, or a local "
            "folder (default models/)"
        )
    elif not text:
        raise StorageError(f"{var}=: pass {var}=models/ or {var}=s3://BUCKET/PREFIX")
    return text


def s3_location(repo: str) -> S3Location | None:
    """The bucket repo= names, or None for a local folder."""
    return S3Location.parse("repo", repo) if repo.startswith(SCHEME) else None


def endpoint_url() -> str | None:
    """A custom S3 endpoint (MinIO, moto, Ceph): AWS_ENDPOINT_URL_S3, else AWS_ENDPOINT_URL."""
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


def _where() -> str:
    url = endpoint_url()
    return f"AWS_ENDPOINT_URL={url}" if url else "AWS S3 (no AWS_ENDPOINT_URL set)"


def client():
    """A boto3 S3 client from the usual AWS variables and config, failing fast on a dead
    endpoint (two attempts, 5 s to connect)."""
    import boto3
    from botocore.config import Config

    config = Config(
        connect_timeout=CONNECT_TIMEOUT,
        read_timeout=60,
        retries={"max_attempts": 2, "mode": "standard"},
        s3={"addressing_style": "path"},  # a self-hosted endpoint has no bucket subdomains
    )
    session = boto3.session.Session()
    return session.client("s3", endpoint_url=endpoint_url(), config=config)


def explain(err: Exception, location: S3Location) -> StorageError | None:
    """Our one line for a boto3 failure on `location`, or None if it is not one we know."""
    from botocore.exceptions import (
        ClientError,
        EndpointConnectionError,
        NoCredentialsError,
        PartialCredentialsError,
    )

    if isinstance(err, EndpointConnectionError):
        return StorageError(
            f"repo={location}: nothing answers at {_where()}; start the S3 server, or set "
            "AWS_ENDPOINT_URL to one that answers"
        )
    if isinstance(err, (NoCredentialsError, PartialCredentialsError)):
        return StorageError(
            f"repo={location}: no AWS credentials found; set AWS_ACCESS_KEY_ID and "
            "AWS_SECRET_ACCESS_KEY (or configure a profile with `aws configure`)"
        )
    if not isinstance(err, ClientError):
        return None
    code = str(err.response.get("Error", {}).get("Code", ""))
    status = err.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    if code in ("404", "NoSuchBucket"):
        return StorageError(
            f"repo={location}: bucket '{location.bucket}' does not exist at {_where()}; "
            f"create it (aws s3 mb s3://{location.bucket}) or fix repo="
        )
    if code in ("403", "InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied") or (
        status == 403
    ):
        return StorageError(
            f"repo={location}: access denied to bucket '{location.bucket}' at {_where()} "
            f"({code}); check AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, and that they may "
            "read and write the bucket"
        )
    return StorageError(f"repo={location}: S3 said {code}: {err}")


def check_bucket(s3, location: S3Location) -> None:
    """Fail in one line unless the bucket exists and these credentials may use it."""
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        s3.head_bucket(Bucket=location.bucket)
    except (BotoCoreError, ClientError) as err:
        raise (explain(err, location) or err) from None


def read_manifest(s3, location: S3Location) -> dict:
    """The manifest of what is published under the prefix ({} if nothing is yet)."""
    import json

    try:
        body = s3.get_object(Bucket=location.bucket, Key=location.manifest_key)["Body"].read()
    except s3.exceptions.NoSuchKey:
        return {}
    return json.loads(body)


def credentials_environment() -> dict[str, str]:
    """AWS_* variables for a child process that reads S3 (tritonserver): the credentials and
    region boto3 resolves (environment, profile, config files), so both read the same bucket."""
    import boto3

    session = boto3.session.Session()
    found: dict[str, str] = {}
    credentials = session.get_credentials()
    if credentials is not None:
        frozen = credentials.get_frozen_credentials()
        found["AWS_ACCESS_KEY_ID"] = frozen.access_key
        found["AWS_SECRET_ACCESS_KEY"] = frozen.secret_key
        if frozen.token:
            found["AWS_SESSION_TOKEN"] = frozen.token
    found["AWS_DEFAULT_REGION"] = session.region_name or "us-east-1"
    return found


def served_repository(repo: str) -> tuple[Path | str, dict[str, str]]:
    """What tritonserver is given for repo=: --model-repository and the environment it needs
    (for a bucket: the translated s3:// path and boto3's credentials and region)."""
    location = s3_location(repo)
    if location is None:
        return paths.ROOT / repo, {}
    return location.triton_path(endpoint_url()), credentials_environment()


def check_published(location: S3Location) -> dict:
    """The manifest of a bucket location that holds a published repository; else one line."""
    from botocore.exceptions import BotoCoreError, ClientError

    s3 = client()
    try:
        check_bucket(s3, location)
        manifest = read_manifest(s3, location)
    except (BotoCoreError, ClientError) as err:
        raise (explain(err, location) or err) from None
    if not manifest.get("models"):
        raise StorageError(
            f"repo={location}: nothing is published there; run doit publish repo={location}"
        )
    return manifest


def manifest_reader(location: S3Location):
    """A callable returning the location's manifest now (the watcher calls it each poll)."""
    s3 = client()
    return lambda: read_manifest(s3, location)
