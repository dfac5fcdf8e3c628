"""The package's import structure: no cycles, imports inside functions only for optional heavy
dependencies, nothing process-wide done at import, and a core that needs only the core
dependencies of pyproject.toml.

The import graph is read from the source with `ast` (every .py file under mmjax/): nodes are
modules (a package is its __init__), an edge A -> B when A imports B at module level or inside a
function. `import a.b.c` and `from a.b import c` also run the packages a and a.b, so they are
edges too, except to A's own packages (Python runs those before A anyway).
"""

import ast
import ctypes
import importlib.metadata
import json
import os
import re
import subprocess
import sys
import tomllib

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Function-level imports of packages outside mmjax that are allowed, and why: each is heavy to
# import and only one feature of its module needs it.
LAZY_ALLOWED = {
    "torch": "GBs; only .pt/.bin files and as_torch=True need it",
    "tensorflow": "seconds to import; optional (the tf extra)",
    "transformers": "heavy; parity and conversion helpers only",
    "open_clip": "imports torch",
    "nltk": "optional: CatLIP's labels='wordnet' only",
    "sklearn": "imports scipy (~0.7 s): the digits build and the probes only",
    "matplotlib": "slow to import: the end-of-run plot only",
    "tensorboardX": "slow to import (~0.8 s): the metric writer only",
    "webdataset": "imports torch (~1 s), a test extra: mmjax.data.scenes.write_scene_shards only",
}
# Function-level imports of mmjax modules that are allowed: mmjax.pallas loads
# jax.experimental.pallas and its Mosaic / Triton lowerings, only when a Pallas impl is chosen.
LAZY_MMJAX = ("mmjax.pallas",)


def _modules() -> dict[str, str]:
  """{module name: path} of every .py file under mmjax/."""
  out = {}
  for d, _, files in os.walk(os.path.join(ROOT, "mmjax")):
    for f in files:
      if f.endswith(".py"):
        path = os.path.join(d, f)
        name = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
        out[name.removesuffix(".__init__")] = path
  return out


def _in_function(node, parents) -> bool:
  while node in parents:
    node = parents[node]
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
      return True
  return False


def _targets(name: str, path: str, node, modules) -> list[str]:
  """The modules one import statement names: `from P import n` names P.n when that is a
  module, else P (relative imports resolved)."""
  if isinstance(node, ast.Import):
    return [a.name for a in node.names]
  base = node.module or ""
  if node.level:
    package = name.split(".") if path.endswith("__init__.py") else name.split(".")[:-1]
    package = package[:len(package) - node.level + 1]
    base = ".".join(package + ([node.module] if node.module else []))
  return [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]


def imports(modules=None) -> list[tuple[str, str, int, bool, str]]:
  """(importer, imported module, line, inside a function, the source line) for every import
  statement under mmjax/."""
  modules = modules or _modules()
  out = []
  for name, path in sorted(modules.items()):
    with open(path, encoding="utf-8") as f:
      source = f.read()
    tree, lines = ast.parse(source, path), source.splitlines()
    parents = {c: n for n in ast.walk(tree) for c in ast.iter_child_nodes(n)}
    for node in ast.walk(tree):
      if isinstance(node, (ast.Import, ast.ImportFrom)):
        src = lines[node.end_lineno - 1]
        for t in _targets(name, path, node, modules):
          out.append((name, t, node.lineno, _in_function(node, parents), src))
  return out


def import_graph(modules=None) -> dict[str, set[str]]:
  """{module: the mmjax modules its import statements run}, module- and function-level."""
  modules = modules or _modules()
  graph = {m: set() for m in modules}
  for importer, target, _, _, _ in imports(modules):
    parts = target.split(".")
    for i in range(1, len(parts) + 1):
      dep = ".".join(parts[:i])
      own_package = (importer + ".").startswith(dep + ".")
      if dep in modules and dep != importer and not (i < len(parts) and own_package):
        graph[importer].add(dep)
  return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
  """One cycle [a, b, ..., a] of the graph, or None."""
  state, stack = {}, []

  def visit(m):
    state[m] = "open"
    stack.append(m)
    for n in sorted(graph.get(m, ())):
      if state.get(n) == "open":
        return stack[stack.index(n):] + [n]
      if n not in state:
        found = visit(n)
        if found:
          return found
    stack.pop()
    state[m] = "done"
    return None

  for m in sorted(graph):
    if m not in state:
      found = visit(m)
      if found:
        return found
  return None


def test_find_cycle_reports_the_path():
  """The cycle finder itself, on small graphs (a package's __init__ and its submodule)."""
  assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
  assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
  modules = {"mmjax.x": "mmjax/x/__init__.py", "mmjax.x.y": "mmjax/x/y.py"}
  # mmjax/x/__init__.py: from mmjax.x.y import f; mmjax/x/y.py: from mmjax.x import g
  edges = [("mmjax.x", ast.parse("from mmjax.x.y import f").body[0]),
           ("mmjax.x.y", ast.parse("from mmjax.x import g").body[0])]
  graph = {m: set() for m in modules}
  for importer, node in edges:
    graph[importer].update(_targets(importer, modules[importer], node, modules))
  assert find_cycle(graph) == ["mmjax.x", "mmjax.x.y", "mmjax.x"]
  # from . import y inside mmjax/x/__init__.py names the submodule
  node = ast.parse("from . import y").body[0]
  assert _targets("mmjax.x", "mmjax/x/__init__.py", node, modules) == ["mmjax.x.y"]


def test_no_import_cycles():
  """No two modules of mmjax import each other, directly or through others (package
  __init__ re-exports and function-level imports included)."""
  graph = import_graph()
  assert len(graph) > 50 and graph["mmjax.train.loop"], "the walk found too little"
  cycle = find_cycle(graph)
  assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_imports_inside_functions_are_optional_heavy_dependencies():
  """Inside a function: no mmjax module (but mmjax.pallas), no standard library, only
  LAZY_ALLOWED packages, each with a comment on its line saying why."""
  bad = []
  for importer, target, line, in_function, src in imports():
    if not in_function:
      continue
    where = f"{importer}:{line}: import {target}"
    if target.split(".")[0] == "mmjax":
      if not target.startswith(LAZY_MMJAX):
        bad.append(f"{where} (an mmjax module: import it at module level)")
    elif target.split(".")[0] not in LAZY_ALLOWED:
      bad.append(f"{where} (not an optional heavy dependency: import it at module level)")
    if "#" not in src:
      bad.append(f"{where} (no comment saying why it is inside a function)")
  assert not bad, "\n".join(bad)


def _run(code: str, *args, env=None) -> dict:
  proc = subprocess.run([sys.executable, "-c", code, *args], cwd=ROOT, capture_output=True,
                        text=True, timeout=300, env={**os.environ, **(env or {})})
  assert proc.returncode == 0, proc.stderr[-3000:]
  return json.loads(proc.stdout.strip().splitlines()[-1])


# glibc serves a 64 MiB malloc by mmap under its default settings (above the dynamic mmap
# threshold's 32 MiB ceiling), from the heap once M_MMAP_MAX is 0 (hostmem.keep_freed_memory):
# mallinfo2's hblks (mmap'd blocks) counts one more while such a block is held only by default.
MALLOC_PROBE = r"""
import ctypes, importlib, json, sys
class Info(ctypes.Structure):
  _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd",
                                             "usmblks", "fsmblks", "uordblks", "fordblks",
                                             "keepcost")]
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = Info
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
what = sys.argv[1]
if what == "tuned":   # the control: what the launchers do
  from mmjax import hostmem
  hostmem.keep_freed_memory()
else:
  for name in json.loads(what):
    importlib.import_module(name)
import mmjax.hostmem
before = libc.mallinfo2().hblks
block = libc.malloc(64 << 20)
mapped = libc.mallinfo2().hblks - before
libc.free(block)
print(json.dumps({"mapped": mapped, "applied": mmjax.hostmem.applied}))
"""


def _glibc_mallinfo2() -> bool:
  if not sys.platform.startswith("linux"):
    return False
  try:
    return hasattr(ctypes.CDLL("libc.so.6"), "mallinfo2")
  except OSError:
    return False


@pytest.mark.skipif(not _glibc_mallinfo2(), reason="needs glibc >= 2.33 (mallinfo2), on Linux")
def test_importing_every_module_leaves_malloc_alone():
  """Importing all of mmjax's modules (in a fresh process) leaves glibc's malloc settings as
  they were: a 64 MiB block is still mmap'd. The control process, which calls
  hostmem.keep_freed_memory() as the launchers do, gets it from the heap instead."""
  names = sorted(_modules())
  imported = _run(MALLOC_PROBE, json.dumps(names), env={"MMJAX_KEEP_FREED_MEMORY": "1"})
  tuned = _run(MALLOC_PROBE, "tuned", env={"MMJAX_KEEP_FREED_MEMORY": "1"})
  assert tuned == {"mapped": 0, "applied": True}, tuned   # the check can see a change
  assert imported == {"mapped": 1, "applied": False}, imported


# Import names of everything outside the core dependencies: the extras (kept in sync with
# pyproject.toml by test_core_dependencies_match_the_blocked_imports) and the test-only
# packages mmjax's functions may import.
BLOCKED = ("tensorflow_datasets", "tensorflow", "grain", "array_record", "importlib_resources",
           "orbax", "sklearn", "matplotlib", "sacrebleu", "tensorboardX", "sentencepiece",
           "tokenizers", "PIL", "tqdm", "ml_collections", "ftfy", "regex", "braceexpand",
           "safetensors", "torch", "transformers", "open_clip", "timm", "webdataset", "nltk")
# Not blocked though an extra lists it: a core dependency needs it too (optax and chex
# require absl-py), so a core install has it.
CORE_TRANSITIVE = ("absl",)
CORE_PACKAGES = ("mmjax.losses", "mmjax.nn", "mmjax.models", "mmjax.pallas")
CORE_MODULES = ("mmjax", "mmjax.hostmem", "mmjax.numerics", "mmjax.logit_tiles")

CORE_PROBE = r"""
import importlib, json, sys
import importlib.abc
blocked = set(json.loads(sys.argv[1]))
class Blocked(importlib.abc.MetaPathFinder):
  def find_spec(self, name, path=None, target=None):
    if name.split(".")[0] in blocked:
      raise ImportError(f"{name} is not a core dependency (blocked)")
sys.meta_path.insert(0, Blocked())
for name in json.loads(sys.argv[2]):
  importlib.import_module(name)
import jax, jax.numpy as jnp
import mmjax.losses
x, y = jax.random.normal(jax.random.PRNGKey(0), (2, 4, 8))
loss = mmjax.losses.clip_loss(x, y, jnp.float32(10.0))
print(json.dumps({"loss": float(loss), "torch": "torch" in sys.modules}))
"""


def _core_modules() -> list[str]:
  return sorted(list(CORE_MODULES) + [m for m in _modules() if m.startswith(CORE_PACKAGES)])


def test_core_imports_with_only_core_dependencies():
  """mmjax, mmjax.losses, .nn, .models, .pallas and mmjax.numerics import, and clip_loss
  runs, in a process where every non-core package raises ImportError."""
  names = _core_modules()
  assert "mmjax.models.two_tower" in names and "mmjax.nn.attention" in names
  out = _run(CORE_PROBE, json.dumps(BLOCKED), json.dumps(names))
  assert out["loss"] > 0 and not out["torch"], out


def _normalise(dist: str) -> str:
  return re.sub(r"[-_.]+", "-", dist).lower()


def _requirement_name(req: str) -> str:
  return _normalise(re.match(r"[A-Za-z0-9_.\-]+", req).group(0))


def _import_names() -> dict[str, set[str]]:
  """{normalised distribution name: its top-level import names}, of what is installed (and
  the tf extra's tensorflow-cpu, which need not be)."""
  out = {"tensorflow-cpu": {"tensorflow"}}
  for module, dists in importlib.metadata.packages_distributions().items():
    for d in dists:
      out.setdefault(_normalise(d), set()).add(module)
  return out


def test_core_dependencies_match_the_blocked_imports():
  """pyproject.toml's core dependencies import as names the blocked-import test lets through,
  and every extra's (but test's) packages as names it blocks."""
  with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
    project = tomllib.load(f)["project"]
  names = _import_names()
  core = [_requirement_name(r) for r in project["dependencies"]]
  assert set(core) == {"jax", "flax", "optax", "chex", "numpy"}, core
  core_imports = set().union(*(names.get(d, {d}) for d in core))
  assert not core_imports & set(BLOCKED), core_imports & set(BLOCKED)
  missing = []
  for extra, reqs in project["optional-dependencies"].items():
    for req in reqs:
      dist = _requirement_name(req)
      if extra == "test" or dist == "mmjax":
        continue
      if not names.get(dist, set()) & set(BLOCKED + CORE_TRANSITIVE):
        missing.append(f"{extra}: {dist} imports as {sorted(names.get(dist, ['?']))}, not in "
                       "BLOCKED")
  assert not missing, "\n".join(missing)


def test_importing_mmjax_adds_no_logging_filter():
  """Logging is process-wide too: importing every mmjax module adds no filter to the root or
  absl loggers (the launchers quiet TFDS themselves: pipeline.quiet_tfds_noise). (Handlers are
  not compared: grain adds a root handler when it is imported.)"""
  code = (
      "import importlib, logging, pkgutil, mmjax\n"
      "names = ('', 'absl')\n"
      "before = {n: list(logging.getLogger(n).filters) for n in names}\n"
      "for m in pkgutil.walk_packages(mmjax.__path__, 'mmjax.'):\n"
      "  importlib.import_module(m.name)\n"
      "after = {n: list(logging.getLogger(n).filters) for n in names}\n"
      "assert before == after, (before, after)\n"
      "from mmjax.data import pipeline\n"
      "pipeline.quiet_tfds_noise(); pipeline.quiet_tfds_noise()\n"
      "assert len(logging.getLogger('absl').filters) == 1\n")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       cwd=ROOT, timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
