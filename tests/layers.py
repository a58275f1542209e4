"""The intended import order of vlmforge, written down once, and the checker that holds the code to it.

A package (or top-level module) may import from its own package and from any unit in a lower
layer, never from its own layer or above. Within a layer the units are independent of each other.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

# Lowest first. Each name is a top-level module or package of vlmforge.
LAYERS: list[list[str]] = [
    ["vlmforge"],  # the package itself: __version__
    ["errors"],  # UserError, ConfigError
    ["config", "files", "dist", "plugins", "imagedecode"],  # recipe schemas and loader; manifests and atomic writes; torchrun; plug-in folders; image bytes -> RGB
    ["clitools", "shards", "arch", "report"],  # recipe flags; webdataset shards; model/data contract; run reports
    ["images", "text"],  # pixel preprocessing; tokenizers and chat encoding
    ["synth"],  # the built-in synthetic world
    ["model", "data"],  # the VLM; the pretraining and SFT data paths
    ["train", "critic"],  # the one training loop, its objectives, optimizers and checkpoints; process reward scoring
    ["curate", "vision", "plan"],  # caption curation (scores, filter network, dedup, mix); vision tower pretraining; cost planner
    ["eval"],  # benchmarks: tasks, prompts, scorers
    ["preference"],  # preference pairs made from a model's own samples, judged by the eval scorers
    ["rollouts"],  # process reward data: sampled solutions, Monte Carlo step labels (`prm-data`)
    ["cli"],  # `vlmforge <command>`
    ["demo"],  # the whole pipeline, run command by command
    ["__main__"],
]

# Modules that may import inside functions: the command modules, so that `vlmforge --help` does not
# load torch (they import their stage's code in `run`).
COMMAND_MODULE_SUFFIXES = ("command", "cli", "__main__")
# Function-level imports a command module may make from a higher layer: `vlmforge train` builds
# the live evaluation of train.eval_every from the eval package, which sits above train.
UPWARD_COMMAND_IMPORTS = {("vlmforge.train.command", "eval")}
# Optional extras: imported where used, so the core works without them.
OPTIONAL_EXTRAS = {"open_clip", "flash_attn", "torchvision", "lmms_eval", "liger_kernel", "cut_cross_entropy"}


@dataclass(frozen=True)
class Violation:
    module: str
    line: int
    what: str

    def __str__(self) -> str:
        return f"{self.module}:{self.line}: {self.what}"


def rank_of(unit: str) -> int:
    for i, layer in enumerate(LAYERS):
        if unit in layer:
            return i
    raise KeyError(unit)


def unit_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def module_sources(src_root: Path) -> dict[str, tuple[Path, str]]:
    """Dotted module name -> (file, source) for every module under src_root/vlmforge."""
    out = {}
    for path in sorted((src_root / "vlmforge").rglob("*.py")):
        parts = list(path.relative_to(src_root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = (path, path.read_text())
    return out


def _is_package(path: Path) -> bool:
    return path.name == "__init__.py"


def _target(module: str, path: Path, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".")
    if not _is_package(path):
        base = base[:-1]
    base = base[: len(base) - node.level + 1]
    return ".".join(base + ([node.module] if node.module else []))


def _top_level_nodes(tree: ast.Module) -> set[int]:
    """Imports at module level, including those under a top-level if/try (TYPE_CHECKING, fallbacks)."""
    ids: set[int] = set()
    for stmt in tree.body:
        if isinstance(stmt, (ast.Import, ast.ImportFrom)):
            ids.add(id(stmt))
        elif isinstance(stmt, (ast.If, ast.Try)):
            ids.update(id(n) for n in ast.walk(stmt) if isinstance(n, (ast.Import, ast.ImportFrom)))
    return ids


def imports_of(module: str, path: Path, source: str, known: set[str]):
    """(line, imported vlmforge module, imported names, at module level?, third-party root) per import."""
    tree = ast.parse(source, filename=str(path))
    top = _top_level_nodes(tree)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name, (), id(node) in top
        elif isinstance(node, ast.ImportFrom):
            target = _target(module, path, node)
            names = tuple(a.name for a in node.names)
            # `from vlmforge.x import y` where y is a submodule imports the submodule
            subs = [f"{target}.{n}" for n in names if f"{target}.{n}" in known]
            if subs:
                for sub in subs:
                    yield node.lineno, sub, (), id(node) in top
                rest = tuple(n for n in names if f"{target}.{n}" not in known)
                if rest:
                    yield node.lineno, target, rest, id(node) in top
            else:
                yield node.lineno, target, names, id(node) in top


def check(sources: dict[str, tuple[Path, str]]) -> list[Violation]:
    known = set(sources)
    found: list[Violation] = []
    graph: dict[str, set[str]] = {m: set() for m in known}
    for module, (path, source) in sources.items():
        unit = unit_of(module)
        try:
            rank = rank_of(unit)
        except KeyError:
            found.append(Violation(module, 1, f"'{unit}' is in no layer of tests/layers.py"))
            continue
        is_command = module.rsplit(".", 1)[-1].endswith(COMMAND_MODULE_SUFFIXES)
        for line, target, names, at_top in imports_of(module, path, source, known):
            root = target.split(".")[0]
            if not at_top and not is_command and root not in OPTIONAL_EXTRAS:
                found.append(Violation(module, line, f"import of {target} inside a function (only command "
                                                     "modules and optional extras may)"))
            if root != "vlmforge":
                continue
            if target in known:
                graph[module].add(target)
            other = unit_of(target)
            upward_ok = not at_top and is_command and (module, other) in UPWARD_COMMAND_IMPORTS
            if target != "vlmforge" and other != unit and not upward_ok:
                try:
                    other_rank = rank_of(other)
                except KeyError:
                    other_rank = len(LAYERS)
                if other_rank >= rank:
                    found.append(Violation(module, line, f"imports {target}, which is not in a lower layer "
                                                         f"('{unit}' is in layer {rank}, '{other}' in {other_rank})"))
            if target != module:
                for name in names:
                    if name.startswith("_") and not name.startswith("__"):
                        found.append(Violation(module, line, f"imports the private name {name} of {target}"))
    found += [Violation(c[0], 1, "import cycle: " + " -> ".join(c)) for c in cycles(graph)]
    return found


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected component with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            # a package importing its own submodules is not a cycle
            if len(comp) > 1:
                out.append(sorted(comp) + [sorted(comp)[0]])

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out
