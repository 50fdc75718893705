"""llm-in-triton: a Hugging Face transformer to a parity-checked Triton model repository.

    doit task=encode                     build models/encode (the default task)
    doit task=seqcls model=DIR name=sst2 build another deployment beside it
    doit list                            the stages; `doit info TASK` explains one
    doit clean                           remove what the build made

Variables (NAME=VALUE): task, model, name, revision, batch=MIN,OPT,MAX, seq=MIN,OPT,MAX,
precision, backend. See README.md.
"""

from doit.exceptions import InvalidCommand

from tasks import paths
from tasks.errors import SettingsError
from tasks.settings import current

try:
    current()  # validate the command line before any task runs
except SettingsError as err:
    raise InvalidCommand(str(err)) from None

from tasks.download import task_download  # noqa: F401
from tasks.export import task_onnx  # noqa: F401
from tasks.parity import task_parity  # noqa: F401
from tasks.pbtxt import task_pbtxt  # noqa: F401
from tasks.plan import task_plan  # noqa: F401
from tasks.repo import task_repo  # noqa: F401

DOIT_CONFIG = {
    "default_tasks": ["repo"],
    "verbosity": 2,
    "dep_file": str(paths.DEP_FILE),
    "cleanforget": True,
}
