"""Stage `graph`: a picture of the build's DAG for the current variables.

    doit graph task=seqcls precision=int8    writes model_zoo/<name>/graph.svg

The nodes are the tasks the build stages yield for these variables (`download:encode`,
`onnx:encode`, `quantize:...`, `plan:...`, `parity:...`, `pbtxt:...`, `repo:...`), got by
calling the stages' own generators, so the picture is the DAG doit runs. A -> B when one of
B's `file_dep` is one of A's targets, or B has a `task_dep` on A. Layers run left to right by
topological generation (networkx), drawn with matplotlib; both are imported in the action
only, so `doit list` stays fast.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from doit.tools import config_changed

from tasks import artifacts, paths
from tasks.download import task_download
from tasks.errors import fails_cleanly
from tasks.export import task_onnx
from tasks.parity import task_parity
from tasks.pbtxt import task_pbtxt
from tasks.plan import task_plan
from tasks.quantize import task_quantize
from tasks.repo import task_repo
from tasks.settings import Settings, current
from tasks.slot_decoder import task_slots

# The stages whose tasks make the build, in build order (the order of the colours too).
BUILD_STAGES: dict[str, Callable] = {
    "download": task_download,
    "onnx": task_onnx,
    "slots": task_slots,
    "quantize": task_quantize,
    "plan": task_plan,
    "parity": task_parity,
    "pbtxt": task_pbtxt,
    "repo": task_repo,
}

# Fill and border per stage: light fills, so the black labels stay readable.
STAGE_COLOURS = {
    "download": ("#cfe2f3", "#3d85c6"),
    "onnx": ("#d9ead3", "#6aa84f"),
    "slots": ("#d9ead3", "#38761d"),
    "quantize": ("#fce5cd", "#e69138"),
    "plan": ("#f4cccc", "#cc0000"),
    "parity": ("#fff2cc", "#bf9000"),
    "pbtxt": ("#d9d2e9", "#674ea7"),
    "repo": ("#d0e0e3", "#45818e"),
}

GRAPH_TOOLS = ("networkx", "matplotlib")  # their versions are part of what is drawn
FONT_SIZE = 9
SVG_SALT = "llm-in-triton"  # matplotlib's SVG ids from a fixed salt: the same DAG, the same file


@dataclass(frozen=True)
class Dag:
    """The build's tasks and their dependencies, as plain data (what `config_changed` sees)."""

    title: str
    nodes: tuple[str, ...]  # doit task names, in stage order
    edges: tuple[tuple[str, str], ...]  # (upstream, downstream)

    def params(self) -> dict:
        return {"title": self.title, "nodes": list(self.nodes), "edges": [*map(list, self.edges)]}


def build_tasks() -> dict[str, dict]:
    """Every task dict the build stages yield for the current settings, by doit task name."""
    found = {}
    for stage, generator in BUILD_STAGES.items():
        yielded = generator()
        if isinstance(yielded, dict):  # a stage without subtasks
            yielded = [{**yielded, "name": None}]
        for task in yielded or ():
            found[stage if task["name"] is None else f"{stage}:{task['name']}"] = task
    return found


def task_edges(tasks: dict[str, dict]) -> list[tuple[str, str]]:
    """A -> B when B reads a file A makes, or B names A (or A's stage) in its `task_dep`."""
    maker = {str(target): name for name, task in tasks.items() for target in task["targets"]}
    edges = set()
    for name, task in tasks.items():
        for dep in task.get("file_dep", ()):
            if str(dep) in maker:
                edges.add((maker[str(dep)], name))
        for dep in task.get("task_dep", ()):
            edges.update((up, name) for up in tasks if up == dep or up.startswith(f"{dep}:"))
    order = {name: i for i, name in enumerate(tasks)}
    return sorted(edges, key=lambda edge: (order[edge[0]], order[edge[1]]))


def describe(settings: Settings) -> str:
    return (
        f"task={settings.task.name} name={settings.name} precision={settings.precision} "
        f"backend={settings.backend}"
    )


def build_dag() -> Dag:
    """The DAG of the build for the current settings."""
    tasks = build_tasks()
    return Dag(describe(current()), tuple(tasks), tuple(task_edges(tasks)))


def layers(dag: Dag) -> list[list[str]]:
    """The tasks by topological generation, each layer in drawing order: sorted by the mean
    height of each task's predecessors (one barycentre pass of a layered drawing, so fewer
    edges cross than in stage order)."""
    import networkx as nx

    graph = nx.DiGraph(dag.edges)
    graph.add_nodes_from(dag.nodes)
    index = {node: i for i, node in enumerate(dag.nodes)}
    height: dict[str, float] = {}
    found = []
    for generation in nx.topological_generations(graph):

        def barycentre(node: str) -> tuple[float, int]:
            above = [height[p] for p in graph.predecessors(node)]
            return (sum(above) / len(above) if above else 0.0, index[node])

        ordered = sorted(generation, key=barycentre)
        height.update((node, rank - (len(ordered) - 1) / 2) for rank, node in enumerate(ordered))
        found.append(ordered)
    return found


def draw(dag: Dag, target: Path) -> None:
    """Render the DAG left to right to `target`, an SVG or a PNG by its suffix (atomically)."""
    import matplotlib
    import networkx as nx
    from matplotlib.figure import Figure

    ordered = layers(dag)
    layer = {node: i for i, nodes in enumerate(ordered) for node in nodes}
    graph = nx.DiGraph(dag.edges)
    graph.add_nodes_from(dag.nodes)
    # layers as lists, not the sets a node attribute gives: keeps each layer's order
    position = nx.multipartite_layout(graph, subset_key=dict(enumerate(ordered)))
    depth, widest = len(ordered), max(map(len, ordered))
    longest = max(len(node) for node in graph)
    with matplotlib.rc_context({"svg.hashsalt": SVG_SALT, "font.size": FONT_SIZE}):
        figure = Figure(figsize=(depth * (0.08 * longest + 0.8), 0.7 * widest + 1.2))
        axes = figure.add_axes((0.01, 0.01, 0.98, 0.9))
        axes.set_axis_off()
        xs, ys = zip(*position.values())
        spread = max(ys) - min(ys) or 1.0
        axes.set_xlim(min(xs) - 0.5 / depth, max(xs) + 0.5 / depth)
        row = spread / max(widest - 1, 1)  # room below for the arcs, which bulge downwards
        axes.set_ylim(min(ys) - 0.8 * row, max(ys) + 0.4 * row)
        boxes = {node: node_box(axes, node, position[node]) for node in graph}
        for upstream, downstream in dag.edges:
            skips = layer[downstream] - layer[upstream] > 1  # bend around the layers between
            arrow(axes, boxes[upstream], boxes[downstream], bend=0.25 if skips else 0.0)
        figure.suptitle(f"doit graph  {dag.title}", fontsize=FONT_SIZE + 1)
        with artifacts.atomic_target(target) as tmp:
            figure.savefig(tmp, format=target.suffix[1:], metadata={"Date": None})


def render(dag: Dag, target: Path) -> None:
    draw(dag, target)
    print(f"graph: {target.relative_to(paths.ROOT)}", flush=True)


def node_box(axes, node: str, xy):
    """A task's name in a rounded box the colour of its stage."""
    fill, border = STAGE_COLOURS.get(node.split(":")[0], ("#eeeeee", "#666666"))
    return axes.text(
        *xy,
        node,
        ha="center",
        va="center",
        zorder=2,
        bbox={"boxstyle": "round,pad=0.4", "fc": fill, "ec": border, "lw": 1.2},
    )


def arrow(axes, source, target, bend: float) -> None:
    """source's right edge -> target's left edge; edges that skip a layer bend around it."""
    axes.annotate(
        "",
        xy=(0, 0.5),
        xycoords=target,
        xytext=(1, 0.5),
        textcoords=source,
        zorder=1,
        arrowprops={
            "arrowstyle": "-|>",
            "color": "#555555",
            "lw": 0.9,
            "shrinkA": 5,  # past the box's padding
            "shrinkB": 5,
            "connectionstyle": f"arc3,rad={bend}",
        },
    )


def task_graph():
    """Draw the build's DAG for these variables to model_zoo/<name>/graph.svg."""
    settings = current()
    dag = build_dag()
    target = paths.graph_file(settings.name)
    return {
        "actions": [(fails_cleanly(render), [dag, target])],
        "file_dep": [paths.stage_module("graph")],
        "targets": [target],
        "uptodate": [
            config_changed({**dag.params(), "versions": artifacts.versions(*GRAPH_TOOLS)})
        ],
        "clean": [(artifacts.remove_artifacts, [[target]])],
    }
