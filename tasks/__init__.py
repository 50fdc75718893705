"""Build stages of llm-in-triton: one module per stage, each exposing `task_*` generators."""
