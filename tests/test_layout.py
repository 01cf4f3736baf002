"""The layout: the library at the root never imports the study of the paper (study/), the benchmarks (bench/) or the
tools around it (tools/), checked on every import statement of every root module, nested ones included."""
import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LIBRARY = {"model", "lora", "data", "attacks", "ntk", "train", "evaluate", "cli", "runspec", "ledger"}


def imported_modules(source):
    """Top-level names of every module an import statement in `source` brings in (also inside functions)."""
    names = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def outside_library():
    """Module names a library module must not import: the three packages and every module inside them."""
    names = {"study", "bench", "tools"}
    for pkg in ("study", "bench", "tools"):
        names |= {f[:-3] for f in os.listdir(os.path.join(ROOT, pkg)) if f.endswith(".py") and f != "__init__.py"}
    return names


def test_the_check_sees_nested_and_from_imports():
    src = "import os\ndef f():\n    from study import stats\n    import bench.step\nimport lora as L\n"
    assert imported_modules(src) == {"os", "study", "bench", "lora"}


def test_the_root_holds_the_library_only():
    assert {f[:-3] for f in os.listdir(ROOT) if f.endswith(".py")} <= LIBRARY | {"defences"}


def test_the_library_never_imports_the_study_or_the_benchmarks():
    forbidden = outside_library()
    assert {"sweep", "report", "stats", "effects", "get_mpnet"} <= forbidden  # the list is read from the folders
    for f in sorted(os.listdir(ROOT)):
        if f.endswith(".py"):
            with open(os.path.join(ROOT, f)) as fh:
                bad = imported_modules(fh.read()) & forbidden
            assert not bad, f"{f} imports {sorted(bad)}: the library must not depend on study/, bench/ or tools/"
