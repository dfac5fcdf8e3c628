"""Zero-shot prompt templates: CLIP_benchmark writes the class name as '{c}'
(`template.format(c=name)`), open_clip's lists as '{}'; mmjax takes both, one rule for every
reader (the evaluators, --templates files, templates files beside evaluation shards)."""

from __future__ import annotations

import string


def template_problem(template) -> str | None:
  """What keeps `template` from being a prompt template, or None: the class name must appear
  as '{c}' (CLIP_benchmark's, any number of times) or as one '{}' (open_clip's), not both, and
  no other field; '{{' and '}}' are literal braces."""
  if not isinstance(template, str):
    return f"not a string: {template!r}"
  try:
    fields = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
  except ValueError as e:   # an unbalanced brace
    return f"not a format string ({e})"
  other = sorted({f for f in fields if f not in ("", "c")})
  if other:
    return f"fields {other}: only '{{c}}' or '{{}}' is filled in"
  if not fields:
    return "no '{c}' or '{}' for the class name"
  if "" in fields and "c" in fields:
    return "both '{c}' and '{}'"
  if fields.count("") > 1:
    return "more than one '{}'"
  return None


def fill_template(template: str, name: str) -> str:
  """The prompt for class `name` (a template template_problem accepts)."""
  fields = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
  return template.format(name) if "" in fields else template.format(c=name)
