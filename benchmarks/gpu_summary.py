"""benchmarks/gpu.sh's JSON lines -> markdown tables docs/performance.md can take.

  python -m benchmarks.gpu_summary OUTDIR/bench.jsonl > summary.md

One table per benchmark (attention TFLOP/s, loss memory and time, train step samples/s and
MFU), a cell per measurement: its number, or "OOM", "error" or "skipped" (the reasons are
listed under the tables).
"""

from __future__ import annotations

import argparse
import json


def _g(x: float) -> str:
  """3 significant figures, no exponent for the usual sizes."""
  return f"{x:,.0f}" if abs(x) >= 100 else f"{x:.3g}"


def _cell(r: dict | None, fmt) -> str:
  if r is None:
    return "-"
  if "skipped" in r:
    return "skipped"
  if "error" in r:
    return "OOM" if r.get("oom") else "error"
  return fmt(r)


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
  return (["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
          + ["| " + " | ".join(r) + " |" for r in rows])


def attention(rows: list[dict]) -> list[str]:
  if not rows:
    return []
  first = next((r for r in rows if "flop_convention" in r), rows[0])
  out = ["## Attention TFLOP/s", "",
         f"{first.get('dtype')}, {first.get('device_kind', '?')}; FLOPs by "
         f"{first.get('flop_convention', 'FlashAttention count')}; batch x seq = "
         f"{first['batch'] * first['seq']:,} tokens; median of warm timings.", ""]
  impls = list(dict.fromkeys(r["impl"] for r in rows))
  modes = list(dict.fromkeys(r["mode"] for r in rows))
  cols = [(m, i) for m in modes for i in impls]
  for causal in dict.fromkeys(r["causal"] for r in rows):
    for d in dict.fromkeys(r["head_dim"] for r in rows):
      sel = [r for r in rows if r["causal"] == causal and r["head_dim"] == d]
      if not sel:
        continue
      out += [f"head_dim {d}, {sel[0]['heads']} heads, {'causal' if causal else 'not causal'}:",
              ""]
      body = []
      for seq in dict.fromkeys(r["seq"] for r in sel):
        at = {(r["mode"], r["impl"]): r for r in sel if r["seq"] == seq}
        body.append([f"{seq:,}", str(at[cols[0]]["batch"]) if cols[0] in at else "-"]
                    + [_cell(at.get(c), lambda r: _g(r["tflop_per_s"])) for c in cols])
      out += _table(["seq", "batch"] + [f"{i} {m}" for m, i in cols], body) + [""]
  return out


def losses(rows: list[dict]) -> list[str]:
  if not rows:
    return []
  first = rows[0]
  out = ["## Contrastive loss + grad: peak memory and time", "",
         f"dim {first['dim']}, {first['dtype']} embeddings, impl={first['impl']}, "
         f"{first.get('device_kind', '?')}; cells: device peak GiB (allocator's "
         "peak_bytes_in_use, else XLA's compiled temporaries + arguments + outputs) / ms per "
         "loss + grad.", ""]
  blocks = list(dict.fromkeys(r["blocks"] for r in rows))

  def fmt(r):
    peak = r.get("device_peak_mib") or r.get("per_device_peak_mib")
    return f"{_g(peak / 1024)} / {_g(r['median_s'] * 1e3)}"

  body = []
  for loss in dict.fromkeys(r["loss"] for r in rows):
    for batch in dict.fromkeys(r["batch"] for r in rows):
      at = {r["blocks"]: r for r in rows if r["loss"] == loss and r["batch"] == batch}
      body.append([loss, f"{batch:,}"] + [_cell(at.get(b), fmt) for b in blocks])
  return out + _table(["loss", "batch"] + blocks, body) + [""]


def train(rows: list[dict]) -> list[str]:
  runs = [r for r in rows if not r.get("summary")]
  if not runs:
    return []
  summary = next((r for r in rows if r.get("summary")), {})
  first = next((r for r in runs if "step_s" in r), runs[0])
  peak = summary.get("matmul_peak_gflop_per_second") or {}
  out = ["## Train step", "",
         f"{first.get('model')} at batch {first.get('batch')}, AdamW, "
         f"{first.get('device_kind', '?')}; "
         + (f"MFU = model FLOPs / step time / {first['peak_tflop_per_s']:.0f} TFLOP/s "
            f"({first.get('peak_source')}); model FLOPs: {first.get('model_flops_source')}. "
            if first.get("peak_tflop_per_s") else "no datasheet peak for this device (no MFU). ")
         + "Measured matmul peak (bf16/f32 operands, f32 accumulation): "
         + ", ".join(f"{k} {_g(v / 1e3)} TFLOP/s" for k, v in peak.items()) + ".", ""]
  body = [[r.get("library", "mmjax"), str(r.get("attention_impl")), r.get("dtype", "?"),
           _cell(r, lambda r: _g(r["samples_per_second"])),
           _cell(r, lambda r: _g(r["step_s"] * 1e3)),
           _cell(r, lambda r: "-" if r.get("mfu") is None else f"{r['mfu']:.3f}"),
           _cell(r, lambda r: "-" if r.get("device_peak_mib") is None
                 else f"{r['device_peak_mib'] / 1024:.1f}")] for r in runs]
  return out + _table(["library", "attention_impl", "dtype", "samples/s", "step ms", "MFU",
                       "device peak GiB"], body) + [""]


def summarize(rows: list[dict]) -> str:
  by = {}
  for r in rows:
    by.setdefault(r.get("benchmark"), []).append(r)
  out = ["# mmjax on one accelerator (benchmarks/gpu.sh)", ""]
  for env in by.get("env", []):
    out += [f"{env.get('device_kind')} ({env.get('backend')}), jax {env.get('jax')}"
            + (f"; {env['nvidia_smi']}" if env.get("nvidia_smi") else "")
            + (f"; {env['error']}" if env.get("error") else ""), ""]
  for t in by.get("tests", []):
    out += [f"Compiled-kernel tests (pytest -m accelerator tests/test_accelerator.py): "
            f"{t.get('summary') or t.get('error')}", ""]
  out += attention([r for r in by.get("attention", []) if "impl" in r])
  out += losses([r for r in by.get("loss_memory", []) if "blocks" in r])
  out += train(by.get("train_step", []))
  notes = [r for r in rows if "error" in r or "skipped" in r]
  if notes:
    out += ["## Errors and skipped points", ""]
    keys = ("impl", "mode", "seq", "head_dim", "causal", "loss", "blocks", "batch",
            "attention_impl")
    for r in notes:
      where = ", ".join(f"{k}={r[k]}" for k in keys if k in r)
      out.append(f"- {r.get('benchmark')} {where}: {r.get('error') or r.get('skipped')}")
    out.append("")
  return "\n".join(out)


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("jsonl")
  a = p.parse_args()
  with open(a.jsonl) as f:
    rows = [json.loads(line) for line in f if line.startswith("{")]
  print(summarize(rows))


if __name__ == "__main__":
  main()
