"""How moejax's programs are compiled: XLA:CPU options, and JAX's persistent compilation cache.

Outside its bfloat16 GEMM (products of several rows, `moejax.models.layers.linear`)
XLA:CPU has no bfloat16 arithmetic: a pass ("float normalization") widens
bfloat16 operands of a product, and of the slices and reshapes before it,
to float32. Inside a loop (the decode loop over steps, the loop over an
MoE layer's (token, expert) pairs) that widening of a loop-invariant weight
is then hoisted out of the loop by while-loop-invariant code motion, which
materialises a float32 copy of every weight, and of *every* expert of a
stacked `[E, ...]` array, on each call: twice the memory, several times the
traffic, and a bfloat16 model slower than float32. Without that pass the
widening stays fused into the products, which read bfloat16 at memory
bandwidth. `compiler_options()` turns it off for moejax's jitted programs on
the CPU backend; to turn it off for every program of a process (the engine's
too), set before starting Python:

  XLA_FLAGS=--xla_disable_hlo_passes=while-loop-invariant-code-motion

Compilation of the decode programs takes seconds to minutes at real sizes.
`enable_compilation_cache(dir)` (or JAX's own `JAX_COMPILATION_CACHE_DIR`
environment variable) keeps compiled programs on disk, so a second run of
the same setup skips compiling.
"""

from __future__ import annotations

import os

import jax

CPU_OPTIONS = {"xla_disable_hlo_passes": "while-loop-invariant-code-motion"}
"""XLA options moejax compiles its programs with on the CPU backend (see the module docstring)."""

DEFAULT_CACHE_DIR = os.path.join(os.path.expanduser("~"), ".cache", "moejax", "xla")


def compiler_options() -> dict[str, str]:
  """`compiler_options` for `jax.jit` on the default backend: `CPU_OPTIONS` on CPU, none elsewhere."""
  return dict(CPU_OPTIONS) if jax.default_backend() == "cpu" else {}


def enable_compilation_cache(path: str | os.PathLike | None = None) -> str:
  """Keeps every compiled program of this process in JAX's persistent cache at `path`.

  Args:
    path: cache directory (created); default `~/.cache/moejax/xla`.

  Returns:
    The cache directory. Programs are cached however short their compilation;
    a later process with the same program, shapes, options and jax version
    loads them instead of compiling.
  """
  path = os.path.abspath(os.fspath(path or DEFAULT_CACHE_DIR))
  os.makedirs(path, exist_ok=True)
  jax.config.update("jax_compilation_cache_dir", path)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  return path
