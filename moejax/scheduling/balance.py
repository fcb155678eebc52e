"""CPU-assisted computing and loading of missed experts (SPEC section 6).

A missed expert is either copied to the device (and enters the cache) or
computed on the host CPU. Both proceed in parallel, so a step waits for
``max(n_load * c_load, n_cpu * c_cpu)``. :func:`split_load_cpu` balances the
two with two pointers over the missed experts sorted by score, loading the
most important ones (the likeliest to be reused) and computing the least
important ones on the CPU. :func:`greedy_split_load_cpu` is the rule of the
paper's released code (``docs/smoe_release.md``): one greedy pass that sends
each missed expert, in rank order, to the side that is behind, the CPU on a
tie. The per-expert costs are running means of measured times, kept in a
:class:`CostModel`.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp


def _ranked(missing_scores: jax.Array, valid: jax.Array | None) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Present entries and their rank order.

  Returns:
    ``(present, order, n)``: ``[M] bool`` entries that are ``valid`` and not
    ``-inf``; ``[M]`` indices, present entries first by score descending
    (ties: lower index first); ``int32`` number of present entries.
  """
  present = ~jnp.isneginf(missing_scores)
  if valid is not None:
    present = present & valid.astype(bool)
  order = jnp.lexsort((jnp.arange(missing_scores.shape[0]), -missing_scores, ~present))
  return present, order, jnp.sum(present, dtype=jnp.int32)


def split_load_cpu(
  missing_scores: jax.Array, valid: jax.Array | None = None, *, c_load, c_cpu
) -> tuple[jax.Array, jax.Array]:
  """Splits missed experts between loading and CPU computation.

  The present experts (``valid`` and score not ``-inf``), sorted by score
  descending (ties: lower index first), are consumed by two pointers: while
  experts remain, if the accumulated load time is not above the accumulated
  CPU time, the highest remaining one is loaded (load time += ``c_load``),
  otherwise the lowest remaining one is computed on the CPU (CPU time +=
  ``c_cpu``).

  Args:
    missing_scores: ``[M]`` score of each missed expert, in any order
      (e.g. ``[E]`` with ``-inf`` for experts that are not missed).
    valid: optional ``[M] bool``, False for absent entries.
    c_load: seconds to load one expert (may be traced).
    c_cpu: seconds to compute one expert on the CPU (may be traced).

  Returns:
    ``(load, cpu)``, two disjoint ``[M] bool`` masks whose union is the
    present experts.
  """
  present, order, n = _ranked(missing_scores, valid)
  size = missing_scores.shape[0]
  c_load = jnp.asarray(c_load, jnp.float32)
  c_cpu = jnp.asarray(c_cpu, jnp.float32)

  # Loads always take the highest remaining expert and CPU computations the
  # lowest, so the split is fixed by the number of loads.
  def body(i, carry):
    n_load, t_load, t_cpu = carry
    active = i < n
    take_load = active & (t_load <= t_cpu)
    take_cpu = active & (t_load > t_cpu)
    return (n_load + take_load, t_load + jnp.where(take_load, c_load, 0.0), t_cpu + jnp.where(take_cpu, c_cpu, 0.0))

  n_load, _, _ = jax.lax.fori_loop(0, size, body, (jnp.int32(0), jnp.float32(0), jnp.float32(0)))
  rank = jnp.zeros(size, jnp.int32).at[order].set(jnp.arange(size))
  load = present & (rank < n_load)
  return load, present & ~load


def greedy_split_load_cpu(
  missing_scores: jax.Array, valid: jax.Array | None = None, *, c_load, c_cpu
) -> tuple[jax.Array, jax.Array]:
  """Splits missed experts as the paper's released code does.

  One pass over the present experts (``valid`` and key not ``-inf``) in rank
  order, key descending (ties: lower index first). Before each expert the
  accumulated times are compared: if the load time is strictly below the CPU
  time the expert is loaded (load time += ``c_load``), otherwise it is
  computed on the CPU (CPU time += ``c_cpu``). Both start at 0, so the first
  (highest-ranked) expert always goes to the CPU, and the two sides
  interleave in rank order instead of splitting it at one point as
  :func:`split_load_cpu` does. Times accumulate in float32.

  The release ranks missed experts by the number of tokens routed to each
  (ties: first appearance scanning tokens, then positions); in one-token
  decode that is the order of the positions the experts fill. Pass a key
  that encodes the ranking to reproduce it. Its costs are not running means
  but trimmed means of the last 10 measurements (``docs/smoe_release.md``).

  Args:
    missing_scores: ``[M]`` rank key of each missed expert, higher first
      (e.g. ``[E]`` with ``-inf`` for experts that are not missed).
    valid: optional ``[M] bool``, False for absent entries.
    c_load: seconds to load one expert (may be traced).
    c_cpu: seconds to compute one expert on the CPU (may be traced).

  Returns:
    ``(load, cpu)``, two disjoint ``[M] bool`` masks whose union is the
    present experts.
  """
  present, order, n = _ranked(missing_scores, valid)
  c_load = jnp.asarray(c_load, jnp.float32)
  c_cpu = jnp.asarray(c_cpu, jnp.float32)

  def body(i, carry):
    load, t_load, t_cpu = carry
    active = i < n
    take_load = active & (t_load < t_cpu)
    take_cpu = active & ~take_load
    load = load.at[order[i]].set(take_load)
    return load, t_load + jnp.where(take_load, c_load, 0.0), t_cpu + jnp.where(take_cpu, c_cpu, 0.0)

  init = (jnp.zeros(missing_scores.shape, bool), jnp.float32(0), jnp.float32(0))
  load, _, _ = jax.lax.fori_loop(0, missing_scores.shape[0], body, init)
  return load, present & ~load


@flax.struct.dataclass
class CostModel:
  """Running mean cost of one expert load and one CPU expert computation.

  Attributes:
    load_s: ``float32`` mean seconds to copy one expert to the device.
    n_load: ``float32`` loads measured so far (0: ``load_s`` is a prior).
    cpu_s: ``float32`` mean seconds to compute one expert on the CPU.
    n_cpu: ``float32`` CPU computations measured so far.
  """

  load_s: jax.Array
  n_load: jax.Array
  cpu_s: jax.Array
  n_cpu: jax.Array


def init_cost_model(*, load_s: float = 1e-3, cpu_s: float = 1e-3) -> CostModel:
  """A :class:`CostModel` holding prior costs until the first measurement.

  Args:
    load_s: prior seconds per expert load.
    cpu_s: prior seconds per CPU expert computation.
  """
  return CostModel(load_s=jnp.float32(load_s), n_load=jnp.float32(0), cpu_s=jnp.float32(cpu_s), n_cpu=jnp.float32(0))


def _running_mean(mean, count, total, n):
  n = jnp.asarray(n, jnp.float32)
  new_count = count + n
  new_mean = (mean * count + total) / jnp.maximum(new_count, 1)
  return jnp.where(n > 0, new_mean, mean).astype(jnp.float32), new_count


def update_costs(cost: CostModel, *, load_s=None, n_load=0, cpu_s=None, n_cpu=0) -> CostModel:
  """Folds measured times into the running means.

  Args:
    cost: the current :class:`CostModel`.
    load_s: total seconds measured for ``n_load`` expert loads, or None.
    n_load: number of loads ``load_s`` covers (0 leaves the mean as is).
    cpu_s: total seconds measured for ``n_cpu`` CPU expert computations.
    n_cpu: number of CPU computations ``cpu_s`` covers.

  Returns:
    The updated :class:`CostModel`; the first measurement replaces the prior.
  """
  if load_s is not None:
    mean, count = _running_mean(cost.load_s, cost.n_load, load_s, n_load)
    cost = cost.replace(load_s=mean, n_load=count)
  if cpu_s is not None:
    mean, count = _running_mean(cost.cpu_s, cost.n_cpu, cpu_s, n_cpu)
    cost = cost.replace(cpu_s=mean, n_cpu=count)
  return cost
