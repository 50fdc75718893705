"""The files of a published model repository that the API reads, copied from its bucket into a
folder: in `doit k8s`'s pods an init container runs this, and the API serves the folder (Triton
itself reads the bucket).

    python triton/openai_api/bucket.py s3://BUCKET/PREFIX FOLDER   (or Triton's form of
                                    another endpoint: s3://[https://]HOST:PORT/BUCKET/PREFIX)

What is copied is what deployments.py reads: every config.pbtxt, tokenizer.json and chat.json
(not the weights). boto3 finds the credentials and endpoint as Triton's AWS SDK does
($AWS_SHARED_CREDENTIALS_FILE, $AWS_CONFIG_FILE, $AWS_ENDPOINT_URL...).
Imports no build code (tasks/): it runs in a bare server image.
"""

from __future__ import annotations

import sys
from pathlib import Path, PurePosixPath

READ = frozenset({"config.pbtxt", "tokenizer.json", "chat.json"})
SCHEME = "s3://"


def location(repo: str) -> tuple[str | None, str, str]:
    """(endpoint URL or None, bucket, prefix) of a repository as Triton names it:
    s3://BUCKET/PREFIX on AWS, s3://HOST:PORT/BUCKET/PREFIX (http) or
    s3://https://HOST:PORT/BUCKET/PREFIX for another endpoint."""
    rest, scheme = repo.removeprefix(SCHEME), "http"
    if rest.startswith("https://"):
        rest, scheme = rest.removeprefix("https://"), "https"
    first, _, after = rest.partition("/")
    if ":" in first:  # HOST:PORT
        bucket, _, prefix = after.partition("/")
        return f"{scheme}://{first}", bucket, prefix.strip("/")
    return None, first, after.strip("/")


def copy_read_files(repo: str, folder: Path) -> int:
    """Copy the files the API reads from `repo` (as Triton names it) into `folder`, in the
    repository's layout; how many were copied."""
    import boto3

    endpoint, bucket, prefix = location(repo)
    start = f"{prefix}/" if prefix else ""
    s3 = boto3.client("s3", endpoint_url=endpoint)  # None: $AWS_ENDPOINT_URL, or AWS
    copied = 0
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=start):
        for item in page.get("Contents", []):
            relative = PurePosixPath(item["Key"][len(start) :])
            if relative.name not in READ or ".." in relative.parts:
                continue
            target = folder.joinpath(*relative.parts)
            target.parent.mkdir(parents=True, exist_ok=True)
            s3.download_file(bucket, item["Key"], str(target))  # to a temporary name, renamed
            copied += 1
    return copied


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2 or not args[0].startswith(SCHEME):
        sys.exit(f"usage: {Path(__file__).name} s3://BUCKET/PREFIX FOLDER")
    repo, folder = args[0], Path(args[1])
    copied = copy_read_files(repo, folder)
    if not any(folder.glob("*/config.pbtxt")):
        sys.exit(f"openai api: no model's config.pbtxt under {repo}; publish there first")
    print(f"openai api: {copied} files of {repo} copied into {folder}", flush=True)


if __name__ == "__main__":
    main()
