"""Who may use which of Triton's protocols: the admin secret, and the clients' API key.

Triton (2.51 and later) restricts a protocol to requests that carry a header:
`--http-restricted-api=<protocols>:<key>=<value>` and `--grpc-restricted-protocol=...`, where a
gRPC client sends the header as `triton-grpc-protocol-<key>`. Every server we start closes its
admin protocols (loading a model, which can carry code; unloading one; shared memory; trace and
log settings) behind the admin secret. An API key, when one is set, closes inference too.
Health, metadata and statistics stay open: probes and dashboards read them.

No value ever goes on a command line, which `ps` shows to every user of the machine. The server
is started with placeholders (`@ADMIN_KEY@`), and a small preloaded library, secret_args.c
(compiled on first use), puts the values in from files only their owner reads before
tritonserver's main() runs. `verify` then proves the door is locked: anonymous model control is
refused, the secret's is accepted.

Standard library only: the build loads it (tasks/server/), and the supervisor uses it in a
container (`supervisor.py --admin-key-file ... -- tritonserver ...`).
"""

from __future__ import annotations

import hashlib
import os
import secrets
import shutil
import subprocess
import urllib.error
import urllib.request
from pathlib import Path

ADMIN_PROTOCOLS = ("model-repository", "shared-memory", "trace", "logging")
CLIENT_PROTOCOLS = ("inference",)
ADMIN_HEADER = "llm-in-triton-admin"
API_KEY_HEADER = "api-key"
GRPC_HEADER_PREFIX = "triton-grpc-protocol-"  # how Triton reads a restricted header over gRPC
# Where a client's API key comes from: never a doit variable (shell history, doit's state).
API_KEY_VARIABLE = "LLM_IN_TRITON_API_KEY"
API_KEY_FILE_VARIABLE = "LLM_IN_TRITON_API_KEY_FILE"
ARGS_VARIABLE = "LLM_IN_TRITON_SECRET_ARGS"  # read by secret_args.c
SOURCE = Path(__file__).with_name("secret_args.c")
PLACEHOLDERS = {"admin": "@ADMIN_KEY@", "api_key": "@API_KEY@"}


class AccessError(RuntimeError):
    """A secret that cannot be made, read or put in place; the message names the fix."""


def new_secret() -> str:
    return secrets.token_urlsafe(32)


def write_secret(path: Path, value: str | None = None) -> Path:
    """A secret in a file only its owner reads (0600, folder 0700), written atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    descriptor = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w") as handle:
        handle.write((value or new_secret()) + "\n")
    os.replace(tmp, path)
    return path


def read_secret(path: Path) -> str:
    """The first line of a secret file; refused when others may read it or it is empty."""
    path = Path(path)
    try:
        mode = path.stat().st_mode
        value = path.read_text().splitlines()[0].strip() if path.stat().st_size else ""
    except (OSError, IndexError) as err:
        raise AccessError(f"cannot read the secret in {path}: {err}") from None
    if mode & 0o077 and not _mounted_secret(path):
        raise AccessError(f"{path} can be read by others (mode {mode & 0o777:o}); chmod 600 {path}")
    if not value or any(c in value for c in ":@\0") or value.isspace():
        raise AccessError(f"{path} holds no usable secret (empty, or ':', '@' in it)")
    return value


def _mounted_secret(path: Path) -> bool:
    """A Kubernetes Secret volume: group-readable by the pod's fsGroup is its normal state."""
    return str(path).startswith("/var/run/secrets/")


def ensure_secret(path: Path) -> str:
    """The secret in `path`, made there first if there is none."""
    if not Path(path).exists():
        write_secret(path)
    return read_secret(path)


def api_key_from_environment(environ=None) -> str | None:
    """The clients' API key: $LLM_IN_TRITON_API_KEY, or the file $LLM_IN_TRITON_API_KEY_FILE."""
    environ = os.environ if environ is None else environ
    if environ.get(API_KEY_VARIABLE):
        value = environ[API_KEY_VARIABLE].strip()
        if any(c in value for c in ":@\0") or not value:
            raise AccessError(f"${API_KEY_VARIABLE} must not be blank or hold ':' or '@'")
        return value
    if environ.get(API_KEY_FILE_VARIABLE):
        return read_secret(Path(environ[API_KEY_FILE_VARIABLE]))
    return None


def server_arguments(api_key: bool) -> list[str]:
    """tritonserver's flags closing the admin protocols (and inference, with an API key), with
    placeholders where the values go."""
    rules = [(ADMIN_PROTOCOLS, ADMIN_HEADER, PLACEHOLDERS["admin"])]
    if api_key:
        rules.append((CLIENT_PROTOCOLS, API_KEY_HEADER, PLACEHOLDERS["api_key"]))
    flags = []
    for protocols, header, value in rules:
        setting = f"{','.join(protocols)}:{header}={value}"
        flags += [f"--http-restricted-api={setting}", f"--grpc-restricted-protocol={setting}"]
    return flags


def build_library(directory: Path) -> Path:
    """secret_args.c compiled into `directory` (once per source: the name holds its hash)."""
    source = SOURCE.read_bytes()
    library = Path(directory) / f"secret_args-{hashlib.sha256(source).hexdigest()[:12]}.so"
    if library.is_file():
        return library
    compiler = next((c for c in ("cc", "gcc", "clang") if shutil.which(c)), None)
    if compiler is None:
        raise AccessError(
            "serving needs a C compiler once, to build the small library that keeps the "
            "admin secret out of `ps` (triton/supervisor/secret_args.c): apt-get install gcc"
        )
    Path(directory).mkdir(parents=True, exist_ok=True)
    tmp = library.with_name(f".{library.name}.tmp-{os.getpid()}")
    done = subprocess.run(
        [compiler, "-shared", "-fPIC", "-O2", "-o", str(tmp), str(SOURCE)],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        raise AccessError(f"{compiler} could not build {SOURCE.name}:\n{done.stderr.strip()}")
    os.replace(tmp, library)
    return library


def launch_environment(library: Path, files: dict[str, Path]) -> dict[str, str]:
    """Variables that make tritonserver read its placeholders' values from `files`
    ({"admin": path, "api_key": path})."""
    pairs = [
        f"{PLACEHOLDERS[kind].strip('@')}={Path(path).resolve()}" for kind, path in files.items()
    ]
    if any(":" in pair.split("=", 1)[1] for pair in pairs):
        raise AccessError(f"a secret file's path must not hold ':': {files}")
    return {"LD_PRELOAD": str(library), ARGS_VARIABLE: ":".join(pairs)}


def http_headers(admin: str | None = None, api_key: str | None = None) -> dict[str, str]:
    """The HTTP headers that open what `admin` and `api_key` guard."""
    headers = {ADMIN_HEADER: admin, API_KEY_HEADER: api_key}
    return {name: value for name, value in headers.items() if value}


def grpc_headers(admin: str | None = None, api_key: str | None = None) -> dict[str, str]:
    """The same, as gRPC metadata (tritonclient.grpc's `headers=`)."""
    return {GRPC_HEADER_PREFIX + k: v for k, v in http_headers(admin, api_key).items()}


def verify(url: str, admin: str) -> None:
    """Prove the server at http://`url` took the secret: anonymous model control is refused,
    the secret's is accepted. Anything else means a placeholder or no restriction went in."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def status(headers: dict) -> int:
        request = urllib.request.Request(
            f"http://{url}/v2/repository/index", data=b"{}", method="POST", headers=headers
        )
        try:
            with opener.open(request, timeout=10) as reply:
                return reply.status
        except urllib.error.HTTPError as err:
            return err.code

    anonymous, admitted = status({}), status(http_headers(admin))
    if anonymous != 403 or admitted != 200:
        raise AccessError(
            f"the server at {url} does not guard model control as it must (anonymous: HTTP "
            f"{anonymous}, expected 403; with the admin secret: HTTP {admitted}, expected 200)"
        )


def client_headers(protocol: str, admin: str | None = None, api_key: str | None = None) -> dict:
    """`http_headers` or `grpc_headers`, for a tritonclient of `protocol`."""
    return (grpc_headers if protocol == "grpc" else http_headers)(admin, api_key)


class HeaderPlugin:
    """A tritonclient plugin (`client.register_plugin`) that adds `headers` to every request."""

    def __init__(self, headers: dict[str, str]) -> None:
        self.headers = dict(headers)

    def __call__(self, request) -> None:
        request.headers.update(self.headers)


def authorize(client, protocol: str, api_key: str | None = None) -> None:
    """Make every request of a tritonclient carry the API key: `api_key`, else the one the
    environment gives (nothing when there is none)."""
    api_key = api_key or api_key_from_environment()
    if api_key:
        client.register_plugin(HeaderPlugin(client_headers(protocol, api_key=api_key)))
