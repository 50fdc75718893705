"""Defaults that fit the model: a build given no shapes works on a model with few positions."""

from __future__ import annotations

import json

from tests.helpers.models import save_generation_model
from tests.helpers.project import copy_project


def test_the_default_seq_fits_a_256_position_model_and_builds(tmp_path):
    model = save_generation_model(tmp_path / "opt-256", "opt", max_positions=256)
    assert json.loads((model / "config.json").read_text())["max_position_embeddings"] == 256
    project = copy_project(tmp_path / "project")
    run = project.doit("task=causallm", f"model={model}", "batch=1,1,2")
    assert "seq: the default 1,128,512 is cut to 1,128,256" in run.output
    io = json.loads((project.root / "model_zoo" / "causallm" / "parity.json").read_text())
    assert io  # parity passed at the fitted shapes
    config = (project.root / "models" / "causallm_generate" / "config.pbtxt").read_text()
    assert "256" in config
