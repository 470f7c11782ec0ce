"""The package's shape: the configuration layer without megatron-core, no import cycles."""
import ast
import os
import subprocess
import sys

import pytest
from support import REPO

ROOT = REPO
BLOCKED = """
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "megatron" or name.startswith("megatron."):
            raise ImportError(f"megatron-core is blocked in this test: {name}")
sys.meta_path.insert(0, Block())
"""


@pytest.mark.timeout(120)
def test_the_configuration_layer_runs_without_megatron_core():
    """A RunConfig, its validation and `launch.plan` of a GPU recipe, with megatron-core made
    unimportable: the configuration dataclasses import only the standard library (and the
    losses' configs, pure torch), the planner and `validate` read them alone."""
    code = BLOCKED + """
from recipes import get_recipe
from tropd_megatron.validate import validate
from launch.plan import main
validate(get_recipe("llama3_70b_to_8b"), 32)
code = main(["--recipe", "llama3_70b_to_8b", "--gpus", "32"])
assert not any(m == "megatron" or m.startswith("megatron.") for m in sys.modules)
sys.exit(code)
"""
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=100)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "fits:" in out.stdout


def module_imports(package: str = "tropd_megatron") -> dict:
    """{module: the package's modules it imports when it is imported}: module-level imports
    (not those inside functions or under TYPE_CHECKING), with the parent packages an import
    runs."""
    modules = {}
    for folder, _, files in os.walk(os.path.join(ROOT, package)):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                dotted = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
                modules[dotted.removesuffix(".__init__")] = path

    def targets(module, node):
        if isinstance(node, ast.Import):
            return [a.name for a in node.names]
        base = module.split(".") if modules[module].endswith("__init__.py") else module.split(".")[:-1]
        if node.level:
            base = base[: len(base) - node.level + 1]
            name = ".".join(base + ([node.module] if node.module else []))
        else:
            name = node.module
        return [name] + [f"{name}.{a.name}" for a in node.names]

    graph = {}
    for module, path in modules.items():
        found = set()
        for node in ast.parse(open(path).read()).body:
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                continue
            for n in ast.walk(node) if isinstance(node, (ast.If, ast.Try)) else [node]:
                if isinstance(n, (ast.Import, ast.ImportFrom)):
                    for target in targets(module, n):
                        parts = target.split(".")
                        found.update(p for p in (".".join(parts[:i]) for i in range(2, len(parts) + 1))
                                     if p in modules and p != module and not module.startswith(p + "."))
        graph[module] = found
    return graph


def cycles(graph: dict) -> list:
    """The strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_no_import_cycle_between_the_package_modules():
    graph = module_imports()
    assert "tropd_megatron.config.model" in graph and "tropd_megatron.megatron.step" in graph
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]  # the check itself
    assert cycles(graph) == []


def _patches_worker(rank, world):
    from tropd_megatron.megatron import cpu
    from tropd_megatron.megatron.patches import PATCHES

    cpu.enable()
    names = {f"{getattr(p.owner, '__name__', '')}.{p.name}" for p in PATCHES.values()}
    return names, all(getattr(p.owner, p.name) is p.value for p in PATCHES.values())


def test_every_cpu_patch_is_in_place_and_a_renamed_target_fails_loudly():
    """The CPU stand-ins (megatron/cpu.py) are recorded as they are applied (megatron/patches.py): each target holds
    its stand-in on this machine, and a target that does not exist (renamed upstream) raises
    instead of being added as a new, unused attribute."""
    import types

    pytest.importorskip("megatron.core")
    from support.distributed import run_workers
    from tropd_megatron.megatron import cpu
    from tropd_megatron.megatron.patches import patch

    if not cpu.on_cpu():
        pytest.skip("the stand-ins are installed only without CUDA")
    names, in_place = run_workers(_patches_worker, 1)[0]  # a worker: the parent keeps torch as it is
    assert {"torch.cuda.current_device", "megatron.core.transformer.attention.flash_attn_varlen_func",
            "megatron.core.tensor_parallel.random._get_cuda_rng_state", "DynamicInferenceContext.TOKEN_ROUNDER"} <= names
    assert in_place
    with pytest.raises(RuntimeError, match="renamed .* does not exist in the installed version"):
        patch(types.SimpleNamespace(__name__="mod"), "renamed", 1, "a test")
    module = types.SimpleNamespace(__name__="mod", set_state=lambda device, new_state: None)
    with pytest.raises(RuntimeError, match=r"set_state .* parameters begin \('device',\), not \('new_state',\)"):
        patch(module, "set_state", None, "a test", leading_parameters=("new_state",))
    patch(module, "set_state", None, "a test", leading_parameters=("device", "new_state"))
    assert module.set_state is None


def test_the_objective_names_come_from_one_table():
    """objective.name accepts exactly losses.DISTILLATION_OBJECTIVES, each selecting a config of
    its class; the planner reads the selected class's needs, not its name."""
    from recipes import get_recipe
    from tropd_megatron.losses import DISTILLATION_OBJECTIVES
    from tropd_megatron.planner import plan
    from tropd_megatron.run_config import OBJECTIVES, ObjectiveChoice

    assert OBJECTIVES == tuple(DISTILLATION_OBJECTIVES)
    for name, cls in DISTILLATION_OBJECTIVES.items():
        assert type(ObjectiveChoice(name=name).selected()) is cls
    dense = plan(get_recipe("tiny", ["objective.name=dense_kl"]), 2).items
    assert any(k.startswith("teacher logits, dense") for k in dense)
