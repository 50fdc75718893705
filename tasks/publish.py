"""Stage `publish`: upload models/ to `repo=s3://BUCKET/PREFIX`, changed files only, each model
atomically for a server that polls the bucket.

    doit publish repo=s3://models/prod            builds what is stale, then uploads
    doit publish repo=s3://models/prod prune=1    also removes what the build no longer makes

What a polling Triton server (ours with poll=, or a stock one in --model-control-mode=poll)
sees while a publish runs: Triton takes a model to be its folder, and reloads it when any
object in it is newer; it loads the versions its config.pbtxt's version_policy names. So:

- a model whose files changed gets a new version folder, its files first; only then its
  config.pbtxt, written last, names the new version (`version_policy { specific ... }`). A
  server that reloads meanwhile loads the version it had, which is complete;
- a model whose config alone changed gets its config.pbtxt, one object written at once;
- the parts of a deployment go before its ensemble, so an ensemble never names a step
  that is not there;
- the manifest (PREFIX/publish.json: each model's version and sha256 of each file) is
  written after each model: a publish killed part-way leaves the bucket serving what it
  served, and the next publish resumes (files already in the new folder are skipped).

A file is compared by content: its sha256 against the manifest (and the object's own
x-amz-meta-sha256). A file the bucket already serves (in this model's last version, or in
another model: a stream model has its generate model's files) is copied inside the bucket,
not uploaded again. Nothing is removed without prune=1.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from tasks import artifacts, paths, storage
from tasks.errors import BuildError, fails_cleanly
from tasks.settings import Settings, current

MANIFEST_FORMAT = 1
VERSION_POLICY = "version_policy"


class PublishError(BuildError):
    """The repository cannot be published as asked."""


@dataclass(frozen=True)
class LocalModel:
    """One Triton model of models/: its version folder's files and its config."""

    name: str
    files: dict[str, Path]  # filename in the version folder -> local file
    digests: dict[str, str]  # filename -> sha256
    config: str  # config.pbtxt as the repo stage wrote it
    ensemble: bool


def local_models() -> list[LocalModel]:
    """The models of models/, parts first and ensembles last (the order they publish in)."""
    found = []
    names = (
        sorted(p.name for p in paths.MODELS.iterdir() if p.is_dir())
        if paths.MODELS.is_dir()
        else []
    )
    for name in names:
        config, version_dir = paths.repo_config(name), paths.repo_version_dir(name)
        if not config.is_file() or not version_dir.is_dir():
            continue  # not a model the repo stage wrote
        files = {
            p.relative_to(version_dir).as_posix(): p
            for p in sorted(version_dir.rglob("*"))
            if p.is_file()
        }
        text = config.read_text()
        if VERSION_POLICY in text:
            raise PublishError(
                f"{config}: sets its own {VERSION_POLICY}; publish names the version it "
                "uploads: remove it from the template"
            )
        digests = {filename: artifacts.sha256(p) for filename, p in files.items()}
        found.append(LocalModel(name, files, digests, text, 'platform: "ensemble"' in text))
    return sorted(found, key=lambda m: (m.ensemble, m.name))


def published_config(config: str, version: int) -> str:
    """The config.pbtxt a bucket holds: the built one, serving exactly `version`."""
    return (
        f"{config.rstrip()}\n"
        "# Added by doit publish: the one version folder that is complete.\n"
        f"{VERSION_POLICY} {{ specific {{ versions: [ {version} ] }} }}\n"
    )


def text_digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def human_bytes(count: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if count < 1000 or unit == "GB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1000
    return f"{count} B"


@dataclass
class Tally:
    uploaded: int = 0
    copied: int = 0  # inside the bucket, nothing sent
    skipped: int = 0
    removed: int = 0
    bytes: int = 0
    kept: list[str] = field(default_factory=list)  # stale keys left without prune=1

    def summary(self, location: storage.S3Location, seconds: float) -> str:
        line = (
            f"publish: {location}: {self.uploaded} uploaded ({human_bytes(self.bytes)}), "
            f"{self.copied} copied in the bucket, {self.skipped} skipped (unchanged), "
            f"{self.removed} removed, in {seconds:.1f} s"
        )
        if self.kept:
            line += (
                f"; {len(self.kept)} object(s) the build no longer makes are kept "
                "(prune=1 removes them)"
            )
        return line


class Publisher:
    """Publishes local models to one bucket location with one client (see the module)."""

    def __init__(self, s3, location: storage.S3Location, log=print) -> None:
        self.s3, self.location, self.log = s3, location, log
        self.tally = Tally()
        self.manifest: dict = {}
        self.existing: dict[str, int] = {}  # key -> size, under the prefix

    def _echo(self, message: str) -> None:
        self.log(f"publish: {message}")

    def list_keys(self) -> dict[str, int]:
        prefix = self.location.key("") + "/" if self.location.prefix else ""
        found = {}
        for page in self.s3.get_paginator("list_objects_v2").paginate(
            Bucket=self.location.bucket, Prefix=prefix
        ):
            found.update({o["Key"]: o["Size"] for o in page.get("Contents", [])})
        return found

    def object_digest(self, key: str) -> str | None:
        if key not in self.existing:
            return None
        head = self.s3.head_object(Bucket=self.location.bucket, Key=key)
        return head.get("Metadata", {}).get(storage.SHA256_METADATA)

    def run(self, models: list[LocalModel], prune: bool) -> Tally:
        storage.check_bucket(self.s3, self.location)
        self.manifest = storage.read_manifest(self.s3, self.location) or {
            "format": MANIFEST_FORMAT,
            "models": {},
        }
        self.existing = self.list_keys()
        for model in models:
            self.publish_model(model)
        self.prune(models, remove=prune)
        return self.tally

    def next_version(self, model: LocalModel, record: dict | None) -> int:
        """A version no server serves: one past the published one. A folder that a killed
        publish left there is reused (no config ever named it)."""
        if record is not None:
            return int(record["version"]) + 1
        if self.location.key(model.name, "config.pbtxt") not in self.existing:
            return 1  # nothing names any folder of this model yet
        below = self.location.key(model.name) + "/"
        versions = [
            int(first)
            for key in self.existing
            if key.startswith(below) and (first := key[len(below) :].split("/")[0]).isdigit()
        ]
        return max(versions, default=0) + 1

    def publish_model(self, model: LocalModel) -> None:
        record = self.manifest["models"].get(model.name)
        if record is not None and record["files"] == model.digests:
            version = int(record["version"])
            self.tally.skipped += len(model.files)
        else:
            version = self.next_version(model, record)
            self.upload_version(model, version)
        config = published_config(model.config, version)
        config_key = self.location.key(model.name, "config.pbtxt")
        digest = text_digest(config)
        if record is not None and record.get("config") == digest and version == record["version"]:
            self.tally.skipped += 1
            self._echo(f"{model.name}: unchanged (version {version})")
            return
        self.s3.put_object(
            Bucket=self.location.bucket,
            Key=config_key,
            Body=config.encode(),
            ContentType="text/plain",
            Metadata={storage.SHA256_METADATA: digest},
        )
        self.tally.uploaded += 1
        self.tally.bytes += len(config.encode())
        self.manifest["models"][model.name] = {
            "version": version,
            "files": model.digests,
            "config": digest,
            "ensemble": model.ensemble,
        }
        self.write_manifest()
        self._echo(f"{model.name}: config.pbtxt uploaded: serving version {version}")

    def upload_version(self, model: LocalModel, version: int) -> None:
        """Every file of the new version folder, before any config names it."""
        folder = self.location.key(model.name, str(version))
        for filename, source in model.files.items():
            key = f"{folder}/{filename}"
            digest = model.digests[filename]
            if self.object_digest(key) == digest:
                self.tally.skipped += 1
                self._echo(f"{key}: already there (a publish stopped part-way)")
            elif (old := self.published_copy(model.name, digest)) and self.copy(old, key, digest):
                self.tally.copied += 1
                self._echo(f"{key}: unchanged, copied from {old}")
            else:
                size = source.stat().st_size
                self.s3.upload_file(
                    str(source),
                    self.location.bucket,
                    key,
                    ExtraArgs={"Metadata": {storage.SHA256_METADATA: digest}},
                )
                self.tally.uploaded += 1
                self.tally.bytes += size
                self._echo(f"{key}: uploaded ({human_bytes(size)})")
        wanted = {f"{folder}/{f}" for f in model.files}
        for key in sorted(k for k in self.existing if k.startswith(folder + "/")):
            if key not in wanted:  # left by a stopped publish of other files: never served
                self.s3.delete_object(Bucket=self.location.bucket, Key=key)
                self.tally.removed += 1

    def copy(self, old: str, key: str, digest: str) -> bool:
        """Copy inside the bucket; False if the manifest named an object no longer there."""
        from botocore.exceptions import ClientError

        try:
            self.s3.copy_object(
                Bucket=self.location.bucket,
                Key=key,
                CopySource={"Bucket": self.location.bucket, "Key": old},
                Metadata={storage.SHA256_METADATA: digest},
                MetadataDirective="REPLACE",
            )
        except ClientError as err:
            self._echo(f"{key}: cannot copy {old} ({err}); uploading it")
            return False
        return True

    def published_copy(self, name: str, digest: str) -> str | None:
        """A served object with this content, to copy inside the bucket instead of sending it:
        this model's own file first, else any model's (a stream model has its generate
        model's files)."""
        records = self.manifest["models"]
        for model in sorted(records, key=lambda m: m != name):
            record = records[model]
            for published, found in record["files"].items():
                if found == digest:
                    return self.location.key(model, str(record["version"]), published)
        return None

    def write_manifest(self) -> None:
        self.manifest["published"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        self.s3.put_object(
            Bucket=self.location.bucket,
            Key=self.location.manifest_key,
            Body=json.dumps(self.manifest, indent=1, sort_keys=True).encode(),
            ContentType="application/json",
        )

    def wanted_keys(self) -> set[str]:
        """What the bucket holds for the published models: each config, its version's files."""
        wanted = {self.location.manifest_key}
        for name, record in self.manifest["models"].items():
            wanted.add(self.location.key(name, "config.pbtxt"))
            wanted |= {self.location.key(name, str(record["version"]), f) for f in record["files"]}
        return wanted

    def prune(self, models: list[LocalModel], remove: bool) -> None:
        """Objects the build no longer makes: models it does not have, superseded versions."""
        built = {m.name for m in models}
        gone = [n for n in self.manifest["models"] if n not in built]
        if remove and gone:
            # ensembles first: none may name a part that is going; each config first
            gone.sort(key=lambda n: not self.manifest["models"][n].get("ensemble"))
            for name in gone:
                self.delete(self.location.key(name, "config.pbtxt"))
                del self.manifest["models"][name]
                self.write_manifest()
                self._echo(f"{name}: removed (not in models/)")
        stale = sorted(set(self.list_keys()) - self.wanted_keys())
        if not remove:
            self.tally.kept = stale
            return
        for key in stale:
            self.delete(key)

    def delete(self, key: str) -> None:
        self.s3.delete_object(Bucket=self.location.bucket, Key=key)
        self.tally.removed += 1
        self._echo(f"{key}: removed")


def publish(settings: Settings) -> None:
    """Upload the built repository to repo=s3://... (see the module)."""
    from botocore.exceptions import BotoCoreError, ClientError

    location = settings.storage.location
    if location is None:
        raise PublishError(
            f"repo={settings.storage.repo}: doit publish uploads to object storage; pass "
            "repo=s3://BUCKET/PREFIX"
        )
    models = local_models()
    if not models:
        raise PublishError(f"{paths.MODELS} holds no model; build one first (doit)")
    started = time.monotonic()
    publisher = Publisher(storage.client(), location, log=lambda m: print(m, flush=True))
    try:
        tally = publisher.run(models, prune=bool(settings.storage.prune))
    except (BotoCoreError, ClientError) as err:
        raise (storage.explain(err, location) or err) from None
    print(tally.summary(location, time.monotonic() - started), flush=True)


def task_publish():
    """Upload models/ to repo=s3://BUCKET/PREFIX: changed files only, each model atomically."""
    settings = current()
    return {
        "actions": [(fails_cleanly(publish), [settings])],
        # nothing to build for a repo= that cannot be published: fail at once
        "task_dep": ["repo"] if settings.storage.location is not None else [],
        "uptodate": [False],
        "verbosity": 2,
    }
