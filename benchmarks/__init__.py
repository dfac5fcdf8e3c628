"""Benchmark scripts: each prints one JSON object per measurement."""


def emit(line: str, out: str | None = None) -> None:
  """Prints one JSON line and, given a path, appends it there too."""
  print(line, flush=True)
  if out:
    with open(out, "a") as f:
      f.write(line + "\n")
