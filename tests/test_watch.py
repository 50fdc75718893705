"""What the watcher of a served folder counts as a change (tasks/server/watch.py)."""

from __future__ import annotations

import os

from tasks.server import folder_manifest


def test_a_replaced_file_is_a_change_and_the_backends_own_bytecode_is_not(tmp_path):
    version = tmp_path / "encode_model" / "1"
    version.mkdir(parents=True)
    (tmp_path / "encode_model" / "config.pbtxt").write_text('name: "encode_model"\n')
    (version / "model.py").write_text("x = 1\n")
    before = folder_manifest(tmp_path)["models"]["encode_model"]
    (version / "__pycache__").mkdir()  # written by the python backend when it loads model.py
    (version / "__pycache__" / "model.cpython-311.pyc").write_bytes(b"\0")
    assert folder_manifest(tmp_path)["models"]["encode_model"] == before
    (version / ".model.py.tmp").write_text("x = 2\n")  # a rebuild: a new file, renamed in
    os.replace(version / ".model.py.tmp", version / "model.py")
    after = folder_manifest(tmp_path)["models"]["encode_model"]
    assert after["config"] != before["config"] and after["version"] == 1
    assert not after["ensemble"]
