"""The OpenAI-compatible API in front of a local Triton server: a process of its own.

    python triton/openai_api/server.py --triton 127.0.0.1:8001 --repository models \
        [--host 127.0.0.1] [--port 9000] [--max-body-mb 4] [--api-key-file FILE]

Modules beside this file, one job each: parsing (request bodies, 400s naming the field),
api_errors (OpenAI's error object), chat (the model's chat template, as transformers renders
it), deployments (what the repository folder holds), inference (Triton over gRPC, asyncio),
generation (one generated choice, and the stop-string fallback), routes (the HTTP endpoints).
An API key ($LLM_IN_TRITON_API_KEY or $LLM_IN_TRITON_API_KEY_FILE, as for Triton itself, or
--api-key-file where that file exists) is required from clients as `Authorization: Bearer
<key>` and sent on to Triton.
Imports no build code (tasks/): it runs beside Triton in a bare server image too.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ACCESS = HERE.parent / "supervisor" / "access.py"  # the API key's one reader


def api_key(key_file: Path | None = None) -> str | None:
    """The clients' API key, as triton/supervisor/access.py reads it for Triton: from
    `key_file` where that file exists (as the supervisor's --api-key-file), else from the
    environment."""
    spec = importlib.util.spec_from_file_location("llm_in_triton_access", ACCESS)
    access = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(access)
    try:
        if key_file is not None and key_file.exists():
            return access.read_secret(key_file)
        return access.api_key_from_environment()
    except access.AccessError as err:
        sys.exit(f"openai api: {err}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--triton", required=True, help="Triton's gRPC address, host:port")
    parser.add_argument("--repository", required=True, type=Path, help="the model repository")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9000)
    parser.add_argument("--max-body-mb", type=int, default=4, help="larger bodies get 413")
    parser.add_argument(
        "--api-key-file", type=Path, help="the clients' API key; a missing file: none"
    )
    args = parser.parse_args(argv)
    if not args.repository.is_dir():
        sys.exit(f"openai api: --repository {args.repository} is not a folder")

    import uvicorn
    from deployments import Repository
    from inference import Triton
    from routes import API, build_app

    key = api_key(args.api_key_file)
    limit = args.max_body_mb << 20
    api = API(Repository(args.repository), Triton(args.triton, key), key, limit)
    print(
        f"openai api: http://{args.host}:{args.port}/v1 in front of Triton {args.triton} "
        f"({len(api.repository.deployments())} deployments in {args.repository}"
        f"{'; API key required' if key else ''})",
        flush=True,
    )
    uvicorn.run(
        build_app(api),
        host=args.host,
        port=args.port,
        log_level="warning",
        access_log=False,
        timeout_graceful_shutdown=5,
    )


if __name__ == "__main__":
    main()
