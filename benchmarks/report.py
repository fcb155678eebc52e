"""Writes the README's performance section from the benchmark JSON files.

Everything between the markers `<!-- perf:begin -->` and `<!-- perf:end -->`
in README.md is replaced by tables built from `benchmarks/results/*.json`
(machine, date and versions included), so the numbers in the README are the
ones the scripts measured.

  python benchmarks/report.py
"""

from __future__ import annotations

import argparse
import json
import os

from moejax.eval.readme import replace_between

BEGIN, END = "<!-- perf:begin -->", "<!-- perf:end -->"
EDGE = (("rtx3080ti_12gb", "RTX 3080 Ti"), ("rtx4060ti_16gb", "RTX 4060 Ti"), ("a6000_48gb", "A6000"))


def _load(results: str, name: str) -> dict | None:
  path = os.path.join(results, f"{name}.json")
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def _ms(seconds) -> str:
  return "-" if seconds is None else f"{seconds * 1e3:.2f}"


def _table(header: list[str], rows: list[list]) -> list[str]:
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  return lines + ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]


def _machine(report: dict) -> str:
  m, v = report["machine"], report["versions"]
  extra = "".join(f", {k} {v[k]}" for k in ("transformers", "torch") if k in v)
  return (
    f"{report['date'][:10]}, {m['processor']} ({m['cpus']} cores), JAX device {m['jax_device']}, "
    f"jax {v['jax']}{extra}, Python {v['python']}"
  )


def decode_section(r: dict) -> list[str]:
  out = [
    f"`python benchmarks/decode_speed.py` ({_machine(r)}; {r['threads']} threads everywhere, "
    f"{r['new_tokens']} new tokens after a 16-token prompt, float32). The bandwidth bound divides the weight "
    "bytes a token reads by the measured bandwidth of reading that many bytes (a buffer of that size, read "
    "once, where the weights would sit); the script stops if any implementation beats it. This VM's speed "
    "varies between runs: every table comes from one run.",
    "",
  ]
  for model in r["models"]:
    out += [
      f"**{model['name']}** ({model['params'] / 1e6:.1f}M parameters; {model['active_bytes_per_token'] / 1e6:.0f} MB "
      f"of weights read per token; bandwidth bound {model['bandwidth_bound_tpot_s'] * 1e3:.2f} ms/token at the "
      f"measured {model['read_bandwidth_Bps'] / 1e9:.1f} GB/s):",
      "",
    ]
    rows = []
    for row in model["rows"]:
      rows.append(
        [
          row["impl"],
          row["batch"],
          _ms(row.get("ttft_s")),
          _ms(row["tpot_s"]),
          f"{row['vs_transformers']:.2f}x" if "vs_transformers" in row else "-",
          f"{row['vs_llama_cpp']:.2f}x" if "vs_llama_cpp" in row else "-",
          f"{row['of_bandwidth_bound']:.0%}" if "of_bandwidth_bound" in row else "-",
        ]
      )
    out += _table(
      ["implementation", "batch", "TTFT (ms)", "TPOT (ms)", "vs transformers", "vs llama.cpp", "of bandwidth bound"],
      rows,
    ) + [""]
  return out


def offload_section(r: dict) -> list[str]:
  layers = r["model_routing"].values()
  spread = (
    f"{min(x['distinct'] for x in layers)}-{max(x['distinct'] for x in layers)} of the 32 experts per layer, "
    f"step-to-step reuse {min(x['reuse'] for x in layers):.2f}-{max(x['reuse'] for x in layers):.2f}"
  )
  out = [
    f"`python benchmarks/offload_speed.py` ({_machine(r)}): every policy with a quarter and a half of the "
    f"routed experts on the device (E/4 and E/2 slots per layer) on the 128M model, batch 1, {r['windows']} windows of held-out text ({r['prompt_len']} prompt tokens prefilled, "
    f"{r['new_tokens']} teacher-forced through the decode path). The model's own routing over that text moves "
    f"({spread}); *distinct* and *reuse* below are each row's (after substitution). Each policy at its own "
    "setting: the smoe family and buddy at alpha 0.3, cache_prior at strength log(1.3), smoe_release at its "
    "published 0.25 on its pool shared by all layers (its slots are the pool's), the rest without alpha. *Hit* "
    "counts resident and prefetch hits (the paper's ratio), *cache hit* resident hits only; the *Belady* bound is "
    "the best cache hit ratio any cache of the row's size reaches on the row's own routing (with bypass), "
    "*with substitution* the bound when substitution in the alpha window is allowed; a prefetching policy's "
    "cache hit ratio is not bounded by them (its prefetch loads outside the replayed schedule). *Wasted* are "
    "prefetched experts the layer then did not compute. TPOT here is this CPU's (host and device are one "
    "memory: it measures our own overheads); *fwd* is the decoder's forward alone, as the paper's code times "
    "it. Edge-GPU columns are the estimator's TPOT for fp16 weights replayed from each run's trace, with the "
    f"load/CPU split recomputed at each profile's costs (estimates, `moejax.sim`). Split costs: `{r['costs']}`.",
    "",
  ]
  rows = []
  for row in r["rows"]:
    rows.append(
      [
        row["policy"],
        f"{row['alpha']:.2f}",
        row["cache_scope"],
        row["cache_slots"],
        f"{row['hit_ratio']:.3f}",
        f"{row['cache_hit_ratio']:.3f}",
        f"{row['belady_hit_ratio']:.3f}",
        f"{row['substitution_bound_hit_ratio']:.3f}",
        f"{row['distinct_experts']:.1f}",
        f"{row['reuse_rate']:.2f}",
        f"{row['bytes_to_device'] / 1e6:.1f}",
        f"{row['wasted_prefetch_bytes'] / 1e6:.1f}",
        row["cpu_experts"],
        "-" if row["prefetch_loads"] == 0 else f"{row['prefetch_accuracy_selected']:.2f}",
        _ms(row["tpot_s"]),
        _ms(row["tpot_forward_only_s"]),
        *(_ms(row["estimated_tpot_s"][p]) for p, _ in EDGE),
      ]
    )
  out += _table(
    [
      "policy",
      "alpha",
      "cache",
      "slots",
      "hit",
      "cache hit",
      "Belady",
      "with substitution",
      "distinct",
      "reuse",
      "MB copied",
      "wasted MB",
      "CPU experts",
      "prefetch acc.",
      "TPOT here (ms)",
      "fwd (ms)",
      *(f"{n} est. (ms)" for _, n in EDGE),
    ],
    rows,
  )
  return out + [""]


def transfer_section(r: dict) -> list[str]:
  out = [
    f"`python benchmarks/transfer.py` ({_machine(r)}): host->device paths for experts of "
    f"{r['expert_shape']['hidden']}x{r['expert_shape']['ffn']} (3 matrices, float32) against a numpy copy of "
    "the same bytes. On a CPU-only machine host and device share memory, so this is the software path's cost.",
    "",
  ]
  rows = [
    [row["experts"], f"{row['bytes'] / 1e6:.2f}", row["path"], f"{row['GBps']:.1f}", f"{row['vs_numpy']:.0%}"]
    for row in r["rows"]
  ]
  return out + _table(["experts", "MB", "path", "GB/s", "of numpy copy"], rows) + [""]


def scheduler_section(r: dict) -> list[str]:
  c, env = r["config"], r["environment"]
  out = [
    f"`python benchmarks/scheduler_speed.py` (jax {env['jax']}, {env['backend']}, {env['cpu_count']} cores): the "
    f"jitted scheduling decision for one MoE layer ({c['num_experts']} experts, top-{c['top_k']}, "
    f"{c['num_slots']} slots) against the layer's expert compute (hidden {c['hidden']}, expert width "
    f"{c['intermediate']}, {c['dtype']}).",
    "",
  ]
  rows = [
    [
      row["tokens"],
      f"{row['route_us']:.0f}",
      f"{row['admit_us']:.0f}",
      f"{row['schedule_step_us']:.0f}",
      f"{row['moe_layer_us'] / 1e3:.1f}",
      f"{row['step_over_layer']:.2%}",
    ]
    for row in r["results"]
  ]
  return (
    out
    + _table(
      ["tokens", "route (us)", "admit (us)", "route+observe+admit (us)", "MoE layer (ms)", "scheduler / layer"], rows
    )
    + [""]
  )


def scale_section(r: dict) -> list[str]:
  """Real expert sizes: every case of `benchmarks/scale.py`, the prompt pass, and the issue's goals."""
  intro = (
    f"`python benchmarks/scale.py` ({_machine(r)}; {r['threads']} threads everywhere; random checkpoints with "
    f"real expert sizes written by transformers' `save_pretrained`; decode of {r['new_tokens']} teacher-forced "
    f"held-out tokens after a {r['prompt_tokens']}-token prompt, batch 1; moejax with "
    f"`XLA_FLAGS={r['xla_flags']}`). Peak RSS is each case's own process (load: the peak while loading, over "
    "the weights, or for lru/smoe over checkpoint + device cache); compile = first `generate` minus a warm one; "
    "routing: distinct experts per layer / reuse (share of a token's experts the previous token also used) "
    "over the run's tokens. This machine is shared: each row's JSON carries the load average before it ran."
  )
  out = [intro, ""]
  goals = r.get("goals", [])
  if goals:
    out.append("Goals of the issue in this run:")
    out.append("")
    # Above one per core, other processes competed for the cores: the benchmark's own cases (2 threads each) keep
    # the 1-minute load average it records before each case near 1.5-2 on 2 cores.
    busy = r["machine"]["cpus"]
    for g in goals:
      state = "not measured" if g["met"] is None else ("met" if g["met"] else "**not met**")
      value = "-" if g["value"] is None else f"{g['value']:.2f}"
      load = g.get("load_average")
      noisy = (
        (
          f" (measured at load average {load:.1f} on {r['machine']['cpus']} cores: re-measure on a quiet "
          "machine before relying on it)"
        )
        if load is not None and load > busy
        else ""
      )
      note = f" ({g['note']})" if g.get("note") else ""
      out.append(f"- {g['goal']}: {value} (goal <= {g['bound']}): {state}{note}{noisy}")
    out.append("")
  rows = []
  for row in r["rows"]:
    if row.get("impl") == "expert paths":
      continue
    name = row.get("impl", "?") + (f" {row['policy']}" if row.get("policy") else "")
    if "error" in row:
      rows.append([row["model"], row["dtype"], name, f"failed: {row['error'][:80]}"] + [""] * 8)
      continue
    routing = row.get("routing", {})
    spread = ", ".join(f"{v['distinct']}/{v['reuse']:.2f}" for _, v in sorted(routing.items())) or "-"
    load_rss = row.get("peak_load_rss_bytes")
    rows.append(
      [
        row["model"],
        row["dtype"],
        name,
        f"{row['load_s']:.1f}" if "load_s" in row else "-",
        "-"
        if load_rss is None
        else f"{load_rss / 1e9:.2f}"
        + (f" ({row['peak_load_rss_ratio']:.2f}x)" if "peak_load_rss_ratio" in row else ""),
        f"{row['compile_s']:.1f}" if "compile_s" in row else "-",
        _ms(row.get("ttft_s")),
        _ms(row.get("tpot_s")),
        f"{row['hit_ratio']:.2f}" if "hit_ratio" in row else "-",
        f"{row['bytes_to_device'] / 1e6 / row.get('decode_steps', r['new_tokens']):.0f}"
        if "bytes_to_device" in row
        else "-",
        spread,
      ]
    )
  out += _table(
    [
      "model",
      "dtype",
      "implementation",
      "load (s)",
      "peak load RSS (GB)",
      "compile (s)",
      "TTFT (ms)",
      "TPOT (ms)",
      "hit ratio",
      "MB copied / step",
      "routing (distinct/reuse per layer)",
    ],
    rows,
  )
  paths = [row for row in r["rows"] if row.get("impl") == "expert paths"]
  if paths:
    text = (
      "Per-byte speed of one token's k experts (median of alternated runs, GB/s of expert weights; "
      "[slowest, fastest] in brackets): computed from device arrays, computed on the host from the store "
      '(`compute_on("device_host")`, CPU experts), and copied into cache slots:'
    )
    out += ["", text, ""]
    rows = [
      [
        p["model"],
        p["dtype"],
        p["experts"],
        *(
          f"{p['GBps'][n]:.1f} [{p['spread_GBps'][n][0]:.1f}, {p['spread_GBps'][n][1]:.1f}]"
          for n in ("resident", "cpu", "copy")
        ),
      ]
      for p in paths
      if "GBps" in p
    ]
    out += _table(["model", "dtype", "experts", "resident experts", "CPU experts", "slot fill"], rows)
  cache = r.get("compilation_cache_rows", [])
  if cache:
    out += [
      "",
      "Compilation with JAX's persistent cache (`moejax.enable_compilation_cache` / "
      "`JAX_COMPILATION_CACHE_DIR`), the resident case twice from an empty cache: "
      + ", ".join(f"{c['compilation_cache']} {c['compile_s']:.1f} s" for c in cache if c.get("compile_s") is not None)
      + ".",
    ]
  prompt = r.get("prompt_rows", [])
  if prompt:
    runs = {len(t) for p in prompt for t in p.get("prompt_runs_s", {}).values()}
    counted = f"median of {'/'.join(map(str, sorted(runs)))} runs, range in parentheses" if runs else "median"
    out += ["", f"Prompt pass (one forward; {counted}):", ""]
    rows = []
    for dtype in sorted({p["dtype"] for p in prompt}):
      ours = next((p for p in prompt if p["dtype"] == dtype and p.get("impl") == "moejax" and "prompt_s" in p), None)
      hf = next(
        (p for p in prompt if p["dtype"] == dtype and p.get("impl") == "transformers" and "prompt_s" in p), None
      )
      if ours is None or hf is None:
        continue
      for shape in ours["prompt_s"]:
        rows.append(
          [
            prompt[0]["model"],
            dtype,
            shape,
            _prompt_ms(ours, shape),
            _prompt_ms(hf, shape),
            f"{ours['prompt_s'][shape] / hf['prompt_s'][shape]:.2f}x",
          ]
        )
    out += _table(
      ["model", "dtype", "batch x tokens", "moejax (ms)", "transformers (ms)", "moejax / transformers"], rows
    )
  return out + [""]


def _prompt_ms(row: dict, shape: str) -> str:
  """A prompt row's median time at `shape` in ms, with the range of its runs where the JSON has them."""
  runs = row.get("prompt_runs_s", {}).get(shape)
  spread = f" ({min(runs) * 1e3:.0f}-{max(runs) * 1e3:.0f})" if runs else ""
  return _ms(row["prompt_s"][shape]) + spread


def goals_section(results: str) -> list[str]:
  """One line per standing goal: the measured value and whether it is met."""
  out = []
  mark = lambda ok: "met" if ok else "**not met**"
  decode = _load(results, "decode_speed")
  if decode:
    for model in decode["models"]:
      ours = next(r for r in model["rows"] if r["impl"].startswith("moejax") and r["batch"] == 1)
      out.append(
        f"- {model['name']}, resident decode: {ours['vs_transformers']:.2f}x transformers (goal <= 0.5x: "
        f"{mark(ours['vs_transformers'] <= 0.5)}), {ours['of_bandwidth_bound']:.0%} of the read-bandwidth "
        "bound"
        + (
          f", {ours['vs_llama_cpp']:.2f}x llama.cpp (goal <= 1.5x: {mark(ours['vs_llama_cpp'] <= 1.5)})"
          if "vs_llama_cpp" in ours
          else ""
        )
      )
  transfer = _load(results, "transfer")
  if transfer:
    fill = [r["vs_numpy"] for r in transfer["rows"] if r["path"].startswith("engine slot fill")]
    out.append(
      f"- expert slot fill: {min(fill):.0%}-{max(fill):.0%} of a numpy copy (goal >= 70%: {mark(min(fill) >= 0.7)})"
    )
  return (["Against the goals:", ""] + out + [""]) if out else []


def render(results: str) -> str:
  lines = ["_Generated by `python benchmarks/report.py` from `benchmarks/results/*.json`; do not edit by hand._", ""]
  lines += goals_section(results)
  sections = (
    ("decode_speed", decode_section),
    ("offload_speed", offload_section),
    ("transfer", transfer_section),
    ("scheduler_speed", scheduler_section),
    ("scale", scale_section),
  )
  for name, section in sections:
    report = _load(results, name)
    if report is not None:
      lines += [f"### {name}", ""] + section(report)
  return "\n".join(lines)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--results", default="benchmarks/results")
  parser.add_argument("--readme", default="README.md")
  args = parser.parse_args()
  replace_between(args.readme, BEGIN, END, render(args.results))
  print(f"wrote the performance section of {args.readme}")


if __name__ == "__main__":
  main()
