"""Code that runs inside Triton Inference Server (python-backend models) and its clients.

Not a package to import: Triton loads each `model.py` by path, clients run as scripts.
The folder's name is the one OpenAI's Triton compiler uses, which torch and transformers
probe for with `import triton`. When the project root is on sys.path (doit, pytest,
`python -c` here) that probe would find this folder and crash torch half-way through its
import; raising ImportError makes it read as "not installed", which is the truth.
"""

raise ImportError(
    "the project's triton/ folder holds Triton model code, not OpenAI Triton; "
    "run its files as scripts or let Triton load them"
)
