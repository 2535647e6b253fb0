"""The layout's rules: oracleface's import graph has no circles and only ``oracleface.cli``
parses command lines; the library never imports the CLI; dsa_ops never imports oracleface;
the reference ops import only torch; no module runs over ~600 lines without a stated reason."""
import ast
from pathlib import Path

import oracleface

PACKAGE = Path(oracleface.__file__).parent
REPOSITORY = PACKAGE.parent
CLI = "oracleface.cli"
MAX_LINES = 600
# Modules allowed over MAX_LINES, each with the reason it is one module.
LONG_MODULES: dict[str, str] = {
    "csrc/emulation/emulation.cpp": "the host runtime of every emulated primitive: one "
                                    "translation unit, so the emulation builds as one object",
    "csrc/masked_attention/backward.cuh": "the FA2 backward's three kernels (dQ, dK/dV, the wide-V "
                                          "dK sum) with the strip helpers they share; each "
                                          "backward_<dtype>.cu instantiates them together",
}
LINE_LIMITED = (PACKAGE, REPOSITORY / "dsa_ops", REPOSITORY / "benchmarks", REPOSITORY / "tests",
                REPOSITORY / "csrc")
SOURCE_SUFFIXES = (".py", ".cu", ".cuh", ".cpp", ".h")


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


def imported_top_level_packages(path: Path) -> set[str]:
    """The first component of every absolute import in ``path`` (anywhere in the file)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def in_cli(name: str) -> bool:
    return name == CLI or name.startswith(CLI + ".")


def test_the_library_never_imports_the_command_line():
    graph = import_graph()
    library = {name for name in graph if not in_cli(name) and name != "oracleface.__main__"}
    offenders = {name: sorted(filter(in_cli, graph[name])) for name in library}
    assert not {name: found for name, found in offenders.items() if found}


def test_only_the_cli_package_imports_argparse():
    offenders = [str(path.relative_to(REPOSITORY)) for path in PACKAGE.rglob("*.py")
                 if "argparse" in imported_top_level_packages(path)
                 and not in_cli(module_name(path))]
    assert not offenders, f"argparse outside oracleface/cli/: {offenders}"


def test_evaluation_and_completion_do_not_import_the_trainer():
    graph = import_graph()
    for name in ("oracleface.evaluation", "oracleface.completion"):
        assert "oracleface.training.trainer" not in graph[name], name
    assert "oracleface.data.folders" not in graph["oracleface.data.landmarks"]


def test_every_command_has_its_own_module_and_the_trainer_has_no_command_line():
    from oracleface.cli import COMMANDS

    modules = {command.run.__module__ for command in COMMANDS.values()}
    assert len(modules) == len(COMMANDS) and all(map(in_cli, modules)), modules
    assert "oracleface.training.trainer" in import_graph()["oracleface.cli.train"]
    front = ast.parse((PACKAGE / "cli" / "train.py").read_text())
    trainer = ast.parse((PACKAGE / "training" / "trainer.py").read_text())
    assert not [node for node in ast.walk(front) if isinstance(node, ast.ClassDef)]  # no trainer logic
    assert "add_argument" not in ast.dump(trainer)  # no command line in the trainer


def test_dsa_ops_never_imports_oracleface():
    offenders = [str(path.relative_to(REPOSITORY)) for path in (REPOSITORY / "dsa_ops").rglob("*.py")
                 if "oracleface" in imported_top_level_packages(path)]
    assert not offenders


def imported_modules(path: Path) -> set[str]:
    """Every module ``path`` imports by absolute name (anywhere in the file)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_reference_ops_import_only_torch():
    # The reference backend is the oracle the other backends are tested against: it must not
    # depend on any of them (nor on numpy, triton or the extension). A reference may build on
    # another op's reference (the KL on the attention's scores), which is held to the same rule.
    allowed = {"torch", "__future__", "typing", "math", "dataclasses", "functools"}
    references = list((REPOSITORY / "dsa_ops").rglob("reference*.py"))
    assert len(references) >= 4  # one per op package, and the namespace that gathers them
    for path in references:
        extra = {name for name in imported_modules(path)
                 if name.split(".")[0] not in allowed
                 and not (name.startswith("dsa_ops.ops.") and name.endswith(".reference"))}
        assert not extra, f"{path.relative_to(REPOSITORY)} imports {sorted(extra)}"
        relative = [node for node in ast.walk(ast.parse(path.read_text()))
                    if isinstance(node, ast.ImportFrom) and node.level > 0]
        assert not relative, f"{path.relative_to(REPOSITORY)} imports other dsa_ops modules"


def test_no_module_is_over_the_line_limit_without_a_stated_reason():
    long = {str(path.relative_to(REPOSITORY)): len(path.read_text().splitlines())
            for package in LINE_LIMITED
            for path in package.rglob("*") if path.suffix in SOURCE_SUFFIXES}
    long = {path: lines for path, lines in long.items() if lines > MAX_LINES and path not in LONG_MODULES}
    assert not long, f"over {MAX_LINES} lines (split them or state the reason in LONG_MODULES): {long}"


def test_files_are_replaced_atomically_in_one_place_only():
    writers = sorted(str(path.relative_to(REPOSITORY)) for path in PACKAGE.rglob("*.py")
                     if any(call in path.read_text() for call in ("os.replace(", "mkstemp(", "os.rename(")))
    assert writers == ["oracleface/common.py"], "use oracleface.common.atomic_write"
