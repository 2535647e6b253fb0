"""The oracleface package's import graph: no circles, commands never import the CLI back."""
import ast
from pathlib import Path

import oracleface

PACKAGE = Path(oracleface.__file__).parent


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """Module → the oracleface modules it imports anywhere (top level or inside functions)."""
    modules = {module_name(path): path for path in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        imported = set()
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
            imported |= {target for target in targets if target in modules and target != name}
        graph[name] = imported
    return graph


def cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 on the current path, 2 done
    path: list[str] = []

    def visit(node):
        state[node] = 1
        path.append(node)
        for child in sorted(graph[node]):
            if state.get(child) == 1:
                return path[path.index(child):] + [child]
            if child not in state and (found := visit(child)):
                return found
        state[node] = 2
        path.pop()
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_the_package_has_no_import_circles():
    # The package's __init__ files only re-export their children; leave them out.
    graph = {name: {child for child in children if child not in ("oracleface", "oracleface.models")}
             for name, children in import_graph().items()}
    assert cycle(graph) is None, " -> ".join(cycle(graph))


def test_commands_evaluation_and_completion_import_neither_the_cli_nor_the_trainer():
    graph = import_graph()
    for name in ("oracleface.cli.train", "oracleface.evaluation", "oracleface.completion", "oracleface.demo"):
        assert "oracleface.cli" not in graph[name], name
    for name in ("oracleface.evaluation", "oracleface.completion"):
        assert not graph[name] & {"oracleface.cli.train", "oracleface.training.trainer"}, name
    assert "oracleface.data.folders" not in graph["oracleface.data.landmarks"]


def test_train_is_split_into_the_trainer_and_its_command_line():
    assert "oracleface.training.trainer" in import_graph()["oracleface.cli.train"]
    front = ast.parse((PACKAGE / "cli" / "train.py").read_text())
    trainer = ast.parse((PACKAGE / "training" / "trainer.py").read_text())
    assert not [node for node in ast.walk(front) if isinstance(node, ast.ClassDef)]  # no trainer logic
    assert "add_argument" not in ast.dump(trainer)  # no command line in the trainer
