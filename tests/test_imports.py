"""The module layout, read from the sources: scripts import only the libraries, babyllama/ and chatglm_tokenizer/
import no module of the repository root, and the root modules import each other without a cycle."""
import ast
import glob
import os

from conftest import ROOT

LIBRARIES = {"model", "dataset", "dataset_sft", "trainer", "generate", "beam", "rerank", "scoring", "hf_llama"}
PACKAGES = {"babyllama", "chatglm_tokenizer"}
ROOT_MODULES = {os.path.splitext(os.path.basename(p))[0] for p in glob.glob(os.path.join(ROOT, "*.py"))}


def imported(path: str) -> set:
    """Root modules and packages of this repository that the file imports, anywhere in it (lazy imports too)."""
    names = set()
    for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names & (ROOT_MODULES | PACKAGES)


def test_scripts_import_only_the_libraries():
    edges = {m: imported(os.path.join(ROOT, f"{m}.py")) for m in ROOT_MODULES}
    wrong = {m: sorted(uses - LIBRARIES - PACKAGES) for m, uses in edges.items() if uses - LIBRARIES - PACKAGES}
    assert not wrong, f"a script imported as a library: {wrong}"
    for pkg in PACKAGES:
        for path in glob.glob(os.path.join(ROOT, pkg, "*.py")):
            assert not imported(path) - PACKAGES, f"{path} imports a root module"

    def in_cycle(start: str) -> bool:
        todo, seen = list(edges[start] - PACKAGES), set()
        while todo:
            m = todo.pop()
            if m == start:
                return True
            if m not in seen:
                seen.add(m)
                todo.extend(edges[m] - PACKAGES)
        return False

    cycles = sorted(m for m in ROOT_MODULES if in_cycle(m))
    assert not cycles, f"root modules in an import cycle: {cycles}"
