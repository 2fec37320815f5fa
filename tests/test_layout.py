"""The package's floors: every import points down (or sideways within a package), never up.

ops -> attention -> models; data on its own; training -> (models, data, ops), never naming an attention module;
the top-level tools (convert, trained, visualization, cli) above them; no package module imports a script. Leaf
modules (``paths``: how a user's path becomes a path object) import nothing of the package, so every floor may
use them. A
module that imports from a higher floor makes the lower one depend on what it serves (e.g. the training loop on
an evaluation tool built on top of it).
"""
import ast
import pathlib

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "attn_flax"
ALLOWED = {
    "ops": {"ops"},
    "attention": {"attention", "ops"},
    "models": {"models", "attention", "ops"},
    "data": {"data"},
    "training": {"training", "models", "data", "ops"},
}
"""Subpackage -> the subpackages its modules may import from. Subpackages not named here (``study``: the sweep
tool over train.py) sit with the top-level tools and may import any floor, never a script."""
SCRIPTS = {"train", "eval", "visualize", "benchmark", "study"}
LEAVES = {"paths"}
"""Top-level modules that import nothing of the package and that every floor may import."""


def imported_parts(path: pathlib.Path) -> set[str]:
    """The first component after ``attn_flax.`` of every attn_flax import in the file (top-level or local)."""
    parts = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names = []
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] if node.module != "attn_flax" else [f"attn_flax.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        parts |= {n.split(".")[1] for n in names if n.startswith("attn_flax.")}
        parts |= {f"{n}.py" for n in names if n in SCRIPTS}
    return parts


def test_every_import_points_down():
    wrong = []
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(PACKAGE)
        floor = relative.parts[0] if len(relative.parts) > 1 else None
        parts = imported_parts(path)
        allowed = ALLOWED.get(floor, None)
        if relative.stem in LEAVES and floor is None:
            allowed = set()
        bad = {p for p in parts if p.endswith(".py")} if allowed is None else parts - allowed - LEAVES
        wrong += [f"{relative} imports {part}" for part in sorted(bad)]
    assert not wrong, "imports against the floors:\n" + "\n".join(wrong)


def attention_submodules(path: pathlib.Path) -> set[str]:
    """The ``attn_flax.attention.X`` submodules the file imports by name."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("attn_flax.attention."):
            found.add(node.module.split(".")[2])
        elif isinstance(node, ast.ImportFrom) and node.module == "attn_flax.attention":
            found |= {a.name for a in node.names if (PACKAGE / "attention" / f"{a.name}.py").exists()}
    return found


def test_attention_modules_share_helpers_only_through_neutral_modules():
    """An attention module takes shared helpers from ``attention.common`` (or ``ops``), never from a sibling
    module (SE once took ``hidden_width`` from ``cbam.py``); outside the attention package only its package
    (the public names) is imported: a network takes its initialisers from ``ops``, not from the attention package."""
    neutral = {"common", "registry"}
    wrong = []
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(PACKAGE)
        inside = relative.parts[0] == "attention"
        allowed = neutral if inside and relative.name != "__init__.py" else set()
        if inside and relative.name == "__init__.py":
            continue
        wrong += [f"{relative} imports attention.{m}" for m in sorted(attention_submodules(path) - allowed)]
    assert not wrong, "\n".join(wrong)


def test_the_rule_catches_an_upward_import(tmp_path):
    module = tmp_path / "loop.py"
    module.write_text("from attn_flax import evaluation\nfrom attn_flax.attention import cbam\nimport train\n")
    assert imported_parts(module) == {"evaluation", "attention", "train.py"}
    assert attention_submodules(module) == {"cbam"}
