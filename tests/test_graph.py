"""`doit graph`: the picture of the build's DAG is the DAG the stages yield."""

from __future__ import annotations

import itertools
import xml.etree.ElementTree as ET

from tasks import graph, paths, settings
from tests.helpers.stages import settings_from


def dag_for(monkeypatch, **variables) -> graph.Dag:
    monkeypatch.setattr(settings, "_CURRENT", settings_from(**variables))
    return graph.build_dag()


def follows(dag: graph.Dag, *chain: str) -> None:
    """Each task of `chain` reads a file the one before it makes."""
    for upstream, downstream in itertools.pairwise(chain):
        assert (upstream, downstream) in dag.edges, (upstream, downstream, dag.edges)


def test_encode_runs_download_onnx_parity_pbtxt_repo_in_order(monkeypatch):
    dag = dag_for(monkeypatch)
    assert set(dag.nodes) == set(graph.build_tasks())  # every task the stages yield, no more
    follows(dag, "download:encode", "onnx:encode", "parity:encode", "repo:encode_model")
    follows(dag, "onnx:encode", "pbtxt:encode_model", "pbtxt:encode-wiring", "repo:encode")
    order = [node for layer in graph.layers(dag) for node in layer]
    assert order.index("download:encode") < order.index("onnx:encode")
    assert order.index("onnx:encode") < order.index("parity:encode")
    assert order.index("parity:encode") < order.index("repo:encode_model")
    assert not any(node.startswith(("quantize:", "plan:")) for node in dag.nodes)


def test_int8_puts_quantize_between_onnx_and_parity(monkeypatch):
    dag = dag_for(monkeypatch, precision="int8")
    follows(dag, "onnx:encode", "quantize:encode", "parity:encode")
    follows(dag, "quantize:encode", "repo:encode_model")  # it serves the quantized file
    assert "quantize:encode" in dag.params()["nodes"]  # and config_changed sees it
    task = graph_task(monkeypatch, precision="int8")
    assert ["onnx:encode", "quantize:encode"] in task["uptodate"][0].config["edges"]


def test_on_a_tensorrt_host_plan_sits_between_onnx_and_parity(monkeypatch):
    monkeypatch.setattr(settings, "tensorrt_available", lambda: True)
    dag = dag_for(monkeypatch, task="seqcls")
    follows(dag, "download:seqcls", "onnx:seqcls", "plan:seqcls", "parity:seqcls")
    follows(dag, "plan:seqcls", "repo:seqcls_model")
    assert "backend=tensorrt" in dag.title


def graph_task(monkeypatch, **variables) -> dict:
    monkeypatch.setattr(settings, "_CURRENT", settings_from(**variables))
    return graph.task_graph()


def test_the_graph_task_has_a_file_target_a_clean_and_its_dag_in_config_changed(monkeypatch):
    task = graph_task(monkeypatch, task="seqcls", name="sst2")
    assert task["targets"] == [paths.graph_file("sst2")]
    assert paths.stage_module("graph") in task["file_dep"]
    config = task["uptodate"][0].config
    assert "repo:sst2_model" in config["nodes"]
    assert ["download:sst2", "onnx:sst2"] in config["edges"]
    assert task["clean"]


def test_the_svg_is_written_atomically_and_parses_as_svg(monkeypatch, tmp_path):
    dag = dag_for(monkeypatch, precision="int8")
    target = tmp_path / "graph.svg"
    graph.draw(dag, target)
    root = ET.parse(target).getroot()
    assert root.tag == "{http://www.w3.org/2000/svg}svg"
    assert [p.name for p in tmp_path.iterdir()] == ["graph.svg"]  # no temporary left
    first = target.read_bytes()
    graph.draw(dag, target)
    assert target.read_bytes() == first  # the same DAG draws the same file (docs/ diffs)


def test_a_task_dep_is_an_edge_from_each_task_it_names():
    tasks = {
        "a:x": {"targets": ["x.out"]},
        "a:y": {"targets": ["y.out"]},
        "b:z": {"targets": ["z.out"], "file_dep": ["x.out", "source.py"]},
        "c": {"targets": [], "task_dep": ["a", "b:z"]},  # a stage (all its tasks) and a task
    }
    assert graph.task_edges(tasks) == [("a:x", "b:z"), ("a:x", "c"), ("a:y", "c"), ("b:z", "c")]


def test_doit_graph_renders_once_then_is_up_to_date_and_clean_removes_it(project):
    run = project.doit("graph", "precision=int8")
    svg = project.path(paths.graph_file("encode"))
    assert "graph: model_zoo/encode/graph.svg" in run.output
    assert ET.parse(svg).getroot().tag.endswith("svg")
    assert "-- graph" in project.doit("graph", "precision=int8").output  # up to date
    assert ".  graph" in project.doit("graph").output  # fp32 drops quantize: drawn again
    project.doit("clean", "graph")
    assert not svg.exists()
