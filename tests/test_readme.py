"""Every ```python block of README.md and docs/*.md runs, so the examples cannot rot.

Each block is exec'd on its own (one test per block, named by file and line) in a fresh namespace
holding small random values for the names it uses without defining them (`img`, `txt`, `scale`,
`mesh`, `images`, ..., see NAMES), in a temporary working directory that is also $HOME. Files a
block reads by a relative or `~/` path, alone or at the end of a checkpoint spec
('open_clip:ViT-B-32:model.bin'), are made there first (an open_clip checkpoint, a captions file
and its images). A block that uses an undefined name NAMES lacks fails, naming it: add the name to
NAMES. README.md stays a user's document: at most README_MAX_LINES lines, its test command the
one .ci/run runs.
"""

import ast
import builtins
import csv
import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec

from mmjax import convert
from tests.reference import inputs, make_mesh

ROOT = pathlib.Path(__file__).parents[1]
README = ROOT / "README.md"
DOCS = [README, *sorted((ROOT / "docs").glob("*.md"))]
README_MAX_LINES = 250
FENCE = re.compile(r"^```python[ \t]*\n(.*?)^```[ \t]*$", re.M | re.S)
DEFAULT_MODEL = "ViT-B-32"


def python_blocks(path):
  """(path relative to the repository, first line number, source) of every ```python block."""
  text = path.read_text(encoding="utf-8")
  name = path.relative_to(ROOT).as_posix()
  return [(name, text.count("\n", 0, m.start(1)) + 1, m.group(1)) for m in FENCE.finditer(text)]


def _block_id(name, line, src):
  first = next((s.strip() for s in src.splitlines() if s.strip()), "")
  return f"{name}:{line}-" + re.sub(r"[^\w.]+", "_", first).strip("_")[:40]


# ---------------------------------------------------------------- the block's free names

def _function_loads(node, local):
  a = node.args
  params = {x.arg for x in a.posonlyargs + a.args + a.kwonlyargs}
  params |= {x.arg for x in (a.vararg, a.kwarg) if x}
  out = set().union(*(_loads(d, local) for d in a.defaults + [d for d in a.kw_defaults if d]))
  body = node.body if isinstance(node.body, list) else [node.body]
  assigned = {n.id for b in body for n in ast.walk(b)
              if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)}
  return out | (set().union(*(_loads(b, local | params) for b in body)) - assigned)


def _loads(node, local=frozenset()):
  """Names `node` reads that are not bound inside it (lambda/def parameters, comprehension
  targets)."""
  if isinstance(node, (ast.Lambda, ast.FunctionDef, ast.AsyncFunctionDef)):
    return _function_loads(node, local)
  if isinstance(node, (ast.ListComp, ast.SetComp, ast.GeneratorExp, ast.DictComp)):
    local = local | {n.id for g in node.generators for n in ast.walk(g.target)
                     if isinstance(n, ast.Name)}
  if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load):
    return set() if node.id in local else {node.id}
  return set().union(*(_loads(c, local) for c in ast.iter_child_nodes(node)))


def _binds(stmt):
  names = set()
  for n in ast.walk(stmt):
    if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store):
      names.add(n.id)
    elif isinstance(n, (ast.Import, ast.ImportFrom)):
      names |= {a.asname or a.name.split(".")[0] for a in n.names}
    elif isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
      names.add(n.name)
  return names


def free_names(src):
  """Names the block reads before (or without) binding them, builtins excepted."""
  bound, free = set(), set()
  for stmt in ast.parse(src).body:
    free |= _loads(stmt) - bound
    bound |= _binds(stmt)
  return free - set(dir(builtins))


def _strings(src):
  return [n.value for n in ast.walk(ast.parse(src))
          if isinstance(n, ast.Constant) and isinstance(n.value, str)]


def _literals(src):
  """The block's string literals, and the parts of each checkpoint spec among them
  ('open_clip:ViT-B-32:/path' -> 'ViT-B-32', '/path')."""
  out = []
  for s in _strings(src):
    out.append(s)
    kind, sep, rest = s.partition(":")
    if sep and kind in ("big_vision", "hf", "open_clip"):
      out += rest.split(":", 1) if kind == "open_clip" else [rest]
  return out


def _model_name(src):
  """The open_clip model the block names (a string literal), else DEFAULT_MODEL."""
  return next((s for s in _literals(src) if s in convert.OPEN_CLIP_MODELS), DEFAULT_MODEL)


# ---------------------------------------------------------------- what the names hold

def _tokens(src):
  from mmjax.data.clip_tokenizer import ClipTokenizer
  spec = convert.get_spec(_model_name(src))
  return ClipTokenizer().encode(["a photo of a cat", "a handwritten 7"], max_len=spec.context_length)


def _images(src, rng):
  size = convert.get_spec(_model_name(src)).image_size
  return jnp.asarray(rng.normal(size=(2, size, size, 3)), jnp.float32)


def _losses(name):
  import mmjax.losses
  return getattr(mmjax.losses, name)


# name -> f(block source, values): values holds one `inputs(16, 32, rng)` draw (img, txt, s, b),
# so that the embeddings, scale and bias of a block are one consistent batch, and `rng`.
NAMES = {
    "jax": lambda src, v: jax,
    "jnp": lambda src, v: jnp,
    "np": lambda src, v: np,
    "P": lambda src, v: PartitionSpec,
    "PartitionSpec": lambda src, v: PartitionSpec,
    "mesh": lambda src, v: make_mesh((8,), ("data",)),
    "img": lambda src, v: v["emb"][0],
    "txt": lambda src, v: v["emb"][1],
    "img_emb": lambda src, v: v["emb"][0],
    "txt_emb": lambda src, v: v["emb"][1],
    "s": lambda src, v: v["emb"][2],
    "scale": lambda src, v: v["emb"][2],
    "b": lambda src, v: v["emb"][3],
    "bias": lambda src, v: v["emb"][3],
    "clip_loss": lambda src, v: _losses("clip_loss"),
    "siglip_loss": lambda src, v: _losses("siglip_loss"),
    "infonce_loss": lambda src, v: _losses("infonce_loss"),
    "q": lambda src, v: v["qkv"][0],
    "k": lambda src, v: v["qkv"][1],
    "v": lambda src, v: v["qkv"][2],
    "images": lambda src, v: _images(src, v["rng"]),
    "tokens": lambda src, v: _tokens(src),
}


# ---------------------------------------------------------------- files the block reads

def _checkpoint(path, src, rng):
  from tests.open_clip_peer import import_open_clip
  open_clip = import_open_clip()
  import torch
  torch.manual_seed(int(rng.integers(2**31)))
  sd = open_clip.create_model(_model_name(src), pretrained=None).state_dict()
  if path.suffix == ".safetensors":
    from safetensors.torch import save_file
    save_file(sd, path)
  else:
    torch.save(sd, path)


def _captions(path, src, rng, n=10):
  from PIL import Image
  rows = []
  for i in range(n):
    Image.fromarray(rng.integers(0, 255, (20 + i, 24, 3), dtype=np.uint8)).save(path.parent / f"{i}.png")
    rows.append({"image": f"{i}.png", "caption": f"random picture number {i}"})
  if path.suffix == ".jsonl":
    import json
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  else:
    with open(path, "w", newline="") as f:
      w = csv.DictWriter(f, ["image", "caption"])
      w.writeheader()
      w.writerows(rows)


FILES = {".bin": _checkpoint, ".pt": _checkpoint, ".pth": _checkpoint,
         ".safetensors": _checkpoint, ".csv": _captions, ".jsonl": _captions}


def _make_files(src, root, rng):
  """Writes, under root, every relative or ~/ file path the block names as a string literal."""
  for s in _literals(src):
    if not re.fullmatch(r"(~/)?[\w.-][\w./-]*", s) or pathlib.PurePath(s).suffix not in FILES:
      continue
    path = root / s.removeprefix("~/")
    if not path.exists():
      path.parent.mkdir(parents=True, exist_ok=True)
      FILES[path.suffix](path, src, rng)


# ---------------------------------------------------------------- the tests

BLOCKS = [b for path in DOCS for b in python_blocks(path)]


def test_readme_and_docs_have_python_blocks():
  for path in DOCS[:1] + [ROOT / "docs" / n for n in ("scaling.md", "checkpoints.md", "data.md")]:
    assert python_blocks(path), f"no ```python blocks found in {path}"


def test_readme_is_short():
  n = len(README.read_text(encoding="utf-8").splitlines())
  assert n <= README_MAX_LINES, (f"README.md has {n} lines, more than {README_MAX_LINES}: "
                                 "reference material belongs in docs/*.md")


def test_readme_test_command_is_what_ci_runs():
  """The README's test commands (the ```bash block that runs pytest) appear in .ci/run."""
  readme = README.read_text(encoding="utf-8")
  block = next(m.group(1) for m in re.finditer(r"^```bash\n(.*?)^```", readme, re.M | re.S)
               if "pytest" in m.group(1))
  ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
  commands = [line.strip() for line in block.splitlines() if line.strip()]
  assert "python -m pytest -q -n 2 tests" in commands, commands
  ci_commands = {c.strip() for line in ci.splitlines() if not line.startswith("#")
                 for c in line.split("&&")}
  missing = [c for c in commands if c not in ci_commands]
  assert not missing, f"README.md's test commands {missing} are not what .ci/run runs: {ci}"


def _anchor(heading):
  """GitHub's anchor of a markdown heading."""
  return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_links_between_docs_resolve():
  """Every relative link of README.md and docs/*.md names an existing file (and heading)."""
  bad = []
  for path in DOCS:
    for target in re.findall(r"\]\(([^)\s]+)\)", path.read_text(encoding="utf-8")):
      if re.match(r"\w+://", target):
        continue
      file, _, anchor = target.partition("#")
      dest = (path.parent / file).resolve() if file else path
      if not dest.exists():
        bad.append(f"{path.name}: {target} (no such file)")
      elif anchor and dest.suffix == ".md":
        headings = re.findall(r"^#+ (.*)$", dest.read_text(encoding="utf-8"), re.M)
        if anchor not in {_anchor(h) for h in headings}:
          bad.append(f"{path.name}: {target} (no such heading)")
  assert not bad, bad


@pytest.mark.parametrize("name,line,src", BLOCKS, ids=[_block_id(*b) for b in BLOCKS])
def test_block_runs(name, line, src, rng, tmp_path, monkeypatch):
  missing = sorted(free_names(src) - set(NAMES))
  assert not missing, (f"{name} block at line {line} uses {missing} without defining them; "
                       "give them values in tests/test_readme.py's NAMES")
  monkeypatch.chdir(tmp_path)
  monkeypatch.setenv("HOME", str(tmp_path))
  _make_files(src, tmp_path, rng)
  values = {"rng": rng, "emb": inputs(16, 32, rng),
            "qkv": [jnp.asarray(rng.normal(size=(2, 16, 2, 8)), jnp.float32) for _ in range(3)]}
  namespace = {"__name__": "__readme__"}
  namespace.update({n: NAMES[n](src, values) for n in free_names(src)})
  # Padded so that a traceback names the file's own line numbers.
  code = compile("\n" * (line - 1) + src, str(ROOT / name), "exec")
  exec(code, namespace)  # noqa: S102
