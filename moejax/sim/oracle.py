"""Offline optimal expert caching: the hits no eviction policy can exceed (SPEC section 5b).

The model
=========
Steps t = 0..T-1 in time order (a per-layer cache sees one step per decode
step; one pool shared by all layers sees the (step, layer) pairs in execution
order). At step t the requests are an int array `requests[t]` of ids, one
element per (token, expert) pair, so an id repeats when several tokens of a
batch route to it. A cache of S slots starts holding `initial` (distinct ids,
at most S).

Between steps any ids may be dropped from the cache. At step t a requested id
in the cache is a hit for each of its pairs. Each missed id is either
admitted into a free slot or, with `bypass=True`, computed elsewhere without
entering the cache (the host CPU). With `bypass=False` (demand paging) every
missed id is admitted, which needs S >= the distinct ids of every step. The
hits and the admitted ids of a step are in the cache together during the
step, as on the device (`moejax.scheduling.cache.admit` shields the experts
of the current layer from eviction). A policy that evicts only to make room
for an admission, as every policy of `moejax.scheduling.cache` does, follows
one of these schedules. Allowing drops at any time keeps the optimum
monotone in the cache: if ids left only to make room, an extra initial id
could lower it, since a hit holds its slot through its step.

The objective counts hits once per distinct (step, id) request
(`objective="requests"`, ties going to more pair hits) or per pair
(`objective="pairs"`, ties going to more distinct hits). The two coincide when
every step has one token (batch-1 decode). `loads` counts the ids the optimal
schedule admits (bypass: only those admitted to be hit later).

What the bound bounds
---------------------
Any policy that admits only experts it computes (no prefetch) follows a
schedule of this model, so its resident hits are at most the optimum at the
same S; with `bypass=True` this holds whether the policy loads every miss or
sends some to the CPU. A prefetch admits an expert before its request: a
prefetched expert used in its target step is a load started early (a
"prefetch hit", not counted here), but one that waits in the cache for a
later step can become a resident hit that no demand schedule gets. Compare
prefetching policies' `cache_hit_ratio` with the bound as a reference, not a
guarantee. The pair hits of a schedule that maximises distinct hits need not
be the most pair hits when a step has several tokens: bound pair hit ratios
with `objective="pairs"` (as `routing_bounds` does).

Why not Belady's rule
---------------------
Belady's rule, after each step keep the S ids whose next request is soonest,
is optimal for demand paging of set requests, and for bypass when a hit may
give its slot to an id admitted in the same step. With bypass it is not
optimal here, because a hit holds its slot through its step: with S = 1 and
requests {0, 1}, {0, 1}, {0, 1}, {1}, both ids are next requested at step 1;
keeping 0 (ties by id) gives 2 hits (0 at steps 1 and 2), keeping 1 gives 3.
`belady` therefore computes the exact optimum as a min-cost flow.

The flow: S units of flow (the slots) run forward in time. For each step t
there are two timeline nodes, before and after the step, joined by an idle
edge (a free slot); for each request (t, x) a node pair joined by a *hold*
edge (x occupies a slot during step t; lower bound 1 under demand paging). A
slot enters a hold by an *admit* edge from the step's first timeline node, or
by a *keep* edge from the hold of x's previous request (or from the start, for
an initial id), which is a hit worth its weight; it leaves a hold by a *drop*
edge to the step's second timeline node or by the keep edge to x's next
request. Every unit crosses each step exactly once, so at most S ids are held
during any step. The constraint matrix of a network flow is totally
unimodular, so the linear program's optimal vertex is integral.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import NamedTuple

import numpy as np

OBJECTIVES = ("requests", "pairs")
SCOPES = ("layer", "global")


class CacheBound(NamedTuple):
  """Hits of an optimal offline schedule.

  Attributes:
    hits: distinct (step, id) requests that hit.
    requests: distinct (step, id) requests.
    pair_hits: (token, expert) pairs that hit.
    pairs: (token, expert) pairs.
    loads: ids admitted into the cache by the schedule.
    hit_ratio: pair_hits / pairs (0 when there are no pairs).
  """

  hits: int
  requests: int
  pair_hits: int
  pairs: int
  loads: int
  hit_ratio: float


class LayerRouting(NamedTuple):
  """One MoE layer's routing in one decode step, as the engine computed it.

  Attributes:
    experts: `[N, k] int32` expert computed for each valid token and routing
      slot, after substitution.
    top: `[N, k] bool`, True where the pair's expert is top-score (SPEC section
      2); substitution never touches those pairs.
  """

  experts: np.ndarray
  top: np.ndarray


class _Step(NamedTuple):
  ids: np.ndarray  # [n] distinct ids requested (or admissible) at the step
  pairs: np.ndarray  # [n] pairs of each id; 0 for an id that may be admitted but is not requested
  requested: np.ndarray  # [n] bool: the id is a request (counted in hits)


def _ids(values, what: str) -> np.ndarray:
  arr = np.asarray(values).ravel()
  if arr.size == 0:
    return np.zeros(0, np.int64)
  if not np.issubdtype(arr.dtype, np.integer):
    raise TypeError(f"{what} must hold integer ids, got dtype {arr.dtype}")
  if arr.min() < 0:
    raise ValueError(f"{what} must hold ids >= 0, got {int(arr.min())}")
  return arr.astype(np.int64)


def _steps(requests: Sequence, extra: Sequence | None = None) -> list[_Step]:
  """Distinct ids and pair counts per step; `extra` ids are admissible without being requested."""
  steps = []
  for t, r in enumerate(requests):
    ids, pairs = np.unique(_ids(r, f"requests[{t}]"), return_counts=True)
    requested = np.ones(len(ids), bool)
    if extra is not None:
      more = np.setdiff1d(_ids(extra[t], f"low_requests[{t}]"), ids)
      ids = np.concatenate([ids, more])
      pairs = np.concatenate([pairs, np.zeros(len(more), pairs.dtype)])
      requested = np.concatenate([requested, np.zeros(len(more), bool)])
    steps.append(_Step(ids, pairs, requested))
  return steps


def _check_cache(num_slots: int, initial, objective: str) -> np.ndarray:
  if isinstance(num_slots, bool) or not isinstance(num_slots, (int, np.integer)) or num_slots < 1:
    raise ValueError(f"num_slots must be an int >= 1, got {num_slots!r}")
  if objective not in OBJECTIVES:
    raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
  init = _ids(initial, "initial")
  if len(np.unique(init)) != len(init) or len(init) > num_slots:
    raise ValueError(f"initial must be at most num_slots={num_slots} distinct ids, got {init.tolist()}")
  return init


def _optimum(steps: list[_Step], num_slots: int, initial: np.ndarray, *, bypass: bool, objective: str) -> CacheBound:
  """The exact optimum of the model in the module docstring, as a min-cost flow (a linear program)."""
  from scipy import optimize, sparse  # imported here: slow to import, and only the bounds need it

  if not bypass:
    for t, s in enumerate(steps):
      if len(s.ids) > num_slots:
        raise ValueError(
          f"bypass=False admits every miss, so every step's ids must fit: step {t} requests "
          f"{len(s.ids)} distinct ids but num_slots={num_slots}; raise num_slots or use bypass=True"
        )
  T = len(steps)
  if T == 0:
    return CacheBound(0, 0, 0, 0, 0, 0.0)
  # One request node r per (step, id), in time order.
  step_of = np.concatenate([np.full(len(s.ids), t) for t, s in enumerate(steps)])
  ids = np.concatenate([s.ids for s in steps])
  pairs = np.concatenate([s.pairs for s in steps]).astype(np.int64)
  requested = np.concatenate([s.requested for s in steps])
  n, n_req, n_pairs = len(ids), int(requested.sum()), int(pairs.sum())
  # The lexicographic objective as one integer weight per request: the primary count times a
  # factor larger than any total of the secondary count.
  if objective == "requests":
    weight = np.where(requested, (n_pairs + 1) + pairs, 0)
  else:
    weight = np.where(requested, (n_req + 1) * pairs + 1, 0)
  # Nodes: 2t before step t, 2t + 1 after it; 2T + 2r and 2T + 2r + 1 enter and leave request r's hold.
  before, after = 2 * step_of, 2 * step_of + 1
  enter, leave = 2 * T + 2 * np.arange(n), 2 * T + 2 * np.arange(n) + 1
  hold_lower = requested & (not bypass)  # demand paging holds every requested id during its step
  prev = np.full(n, -1)  # request node of the same id's previous request
  last: dict[int, int] = {}
  for r, x in enumerate(ids.tolist()):
    prev[r] = last.get(x, -1)
    last[x] = r
  first = {x: r for r, x in reversed(list(enumerate(ids.tolist())))}
  starts = np.array([first[x] for x in initial.tolist() if x in first], np.int64)  # an unrequested one never hits
  kept = np.flatnonzero(prev >= 0)
  groups = [  # (kind, tail, head, lower, upper, cost) of each kind of edge
    ("idle", 2 * np.arange(T), 2 * np.arange(T) + 1, 0, num_slots, 0),
    ("gap", 2 * np.arange(T - 1) + 1, 2 * np.arange(T - 1) + 2, 0, num_slots, 0),
    ("admit", before, enter, 0, 1, 0),
    ("hold", enter, leave, hold_lower.astype(np.int64), 1, 0),
    ("drop", leave, after, 0, 1, 0),
    ("keep", leave[prev[kept]], enter[kept], 0, 1, -weight[kept]),
    ("initial", np.zeros(len(starts), np.int64), enter[starts], 0, 1, -weight[starts]),
  ]
  offset, span = 0, {}
  cols = []
  for name, u, v, lower, upper, c in groups:
    m = len(u)
    span[name] = slice(offset, offset + m)
    cols.append((u, v, np.broadcast_to(lower, m), np.broadcast_to(upper, m), np.broadcast_to(c, m)))
    offset += m
  tail, head, lo, hi, cost = (np.concatenate(parts).astype(float) for parts in zip(*cols))
  edges = np.arange(offset)
  incidence = sparse.coo_matrix(
    (np.r_[np.ones(offset), -np.ones(offset)], (np.r_[tail, head].astype(np.int64), np.r_[edges, edges])),
    shape=(2 * T + 2 * n, offset),
  ).tocsr()
  supply = np.zeros(2 * T + 2 * n)
  supply[0], supply[2 * T - 1] = num_slots, -num_slots
  res = optimize.linprog(cost, A_eq=incidence, b_eq=supply, bounds=np.c_[lo, hi], method="highs-ds")
  if res.status != 0:
    raise RuntimeError(f"the caching flow found no optimum: {res.message}")
  flow = np.rint(res.x).astype(np.int64)
  if np.abs(res.x - flow).max() > 1e-6:
    raise RuntimeError("the caching flow returned a fractional schedule; a network LP should be integral")

  hit = np.zeros(n, bool)
  hit[kept] = flow[span["keep"]] == 1
  hit[starts] |= flow[span["initial"]] == 1
  hit &= requested
  kept_on = np.zeros(n, bool)  # the slot carries the id on to its next request
  kept_on[prev[kept]] = flow[span["keep"]] == 1
  loads = int(np.sum((flow[span["admit"]] == 1) & (hold_lower | kept_on)))
  pair_hits = int(pairs[hit].sum())
  return CacheBound(
    hits=int(hit.sum()),
    requests=n_req,
    pair_hits=pair_hits,
    pairs=n_pairs,
    loads=loads,
    hit_ratio=pair_hits / n_pairs if n_pairs else 0.0,
  )


def belady(
  requests: Sequence, num_slots: int, *, initial: Sequence[int] = (), bypass: bool = True, objective: str = "requests"
) -> CacheBound:
  """The most hits any schedule of `num_slots` slots gets on `requests` (the model in the module docstring).

  Exact: a min-cost flow, not Belady's keep-the-soonest rule, which is not
  optimal when hits hold their slot through their step (module docstring).

  Args:
    requests: per step, an int array of ids, one element per (token, expert)
      pair (any shape; flattened).
    num_slots: S, cache slots.
    initial: ids in the cache before step 0 (distinct, at most S).
    bypass: missed ids may skip the cache (CPU); False: every miss is admitted.
    objective: "requests" (distinct (step, id) hits first) or "pairs".

  Returns:
    A `CacheBound`.
  """
  init = _check_cache(num_slots, initial, objective)
  return _optimum(_steps(requests), num_slots, init, bypass=bypass, objective=objective)


def substitution_bound(
  top_requests: Sequence,
  low_pairs: Sequence[int],
  num_slots: int,
  *,
  initial: Sequence[int] = (),
  low_requests: Sequence | None = None,
  objective: str = "requests",
) -> CacheBound:
  """An upper bound on hits when low-score experts may be substituted (SPEC section 3).

  Every low-score pair is counted a hit (a substitute may always be found), and
  the top-score pairs, which no policy may substitute, get `belady` with
  bypass. Why it bounds every policy that admits only what it computes: follow
  the policy's cache but leave out each id until its first top-score request
  after the policy admitted it for a low-score pair. That schedule is feasible
  for the top-score requests alone and loses one top-score hit per such
  admission, and each admission was a low-score miss, which the bound counts a
  hit. Per pair, that argument needs one token per step (a lost top-score
  request may hold several pairs): pass `low_requests`, the ids computed for
  the low-score pairs, and the schedule may also admit them at those steps,
  which makes the bound hold per pair for any batch. Loose: a substitute is
  not always there.

  Args:
    top_requests: per step, ids of the top-score pairs (as in `belady`).
    low_pairs: per step, the number of low-score pairs.
    num_slots: S, cache slots.
    initial: ids in the cache before step 0.
    low_requests: optional, per step, the `low_pairs[t]` ids computed for the
      low-score pairs (after substitution); admissible at that step.
    objective: "requests" or "pairs", as in `belady`.

  Returns:
    A `CacheBound`; each low-score pair counts as one request and one pair.
  """
  init = _check_cache(num_slots, initial, objective)
  low = [int(n) for n in low_pairs]
  if len(low) != len(top_requests) or min(low, default=0) < 0:
    raise ValueError(f"low_pairs needs one count >= 0 per step ({len(top_requests)} steps), got {low}")
  if low_requests is not None:
    sizes = [np.size(r) for r in low_requests]
    if sizes != low:
      raise ValueError(f"low_requests must hold low_pairs[t] ids per step: sizes {sizes}, low_pairs {low}")
  top = _optimum(_steps(top_requests, low_requests), num_slots, init, bypass=True, objective=objective)
  n_low = sum(low)
  pair_hits, pairs = top.pair_hits + n_low, top.pairs + n_low
  return CacheBound(
    hits=top.hits + n_low,
    requests=top.requests + n_low,
    pair_hits=pair_hits,
    pairs=pairs,
    loads=top.loads,
    hit_ratio=pair_hits / pairs if pairs else 0.0,
  )


def _layer_routing(routing: Sequence[Mapping[int, LayerRouting]], num_experts: int):
  """MoE layer ids in order, and per step and layer the `(experts, top)` arrays flattened and checked."""
  layers = sorted({layer for step in routing for layer in step})
  flat = []
  for t, step in enumerate(routing):
    row = {}
    for layer, lr in step.items():
      experts, top = np.asarray(lr.experts), np.asarray(lr.top, bool)
      if experts.shape != top.shape or experts.ndim != 2:
        raise ValueError(f"step {t} layer {layer}: experts {experts.shape} and top {top.shape} must both be [N, k]")
      experts = _ids(experts, f"step {t} layer {layer} experts")
      if experts.size and experts.max() >= num_experts:
        raise ValueError(f"step {t} layer {layer}: expert id {experts.max()} >= num_experts={num_experts}")
      row[layer] = (experts, top.ravel())
    flat.append(row)
  return layers, flat


def routing_bounds(
  routing: Sequence[Mapping[int, LayerRouting]],
  num_slots: int,
  *,
  num_experts: int,
  scope: str = "layer",
  initial: Mapping[int, Sequence[int]] | Sequence[int] | None = None,
) -> dict:
  """Belady and substitution bounds on the pair hit ratio of a recorded routing trace.

  Both bounds allow bypass (so they bound policies that load every miss and
  those that compute some on the CPU) and maximise pair hits, so they bound
  the resident-hit ratio (`cache_hit_ratio`) of any policy without prefetch
  whose run computed these experts (module docstring).

  Args:
    routing: per decode step, `{moe_layer: LayerRouting}`.
    num_slots: S: slots per MoE layer (scope "layer") or of the one pool shared
      by all layers (scope "global").
    num_experts: routed experts per layer, E.
    scope: "layer": an independent cache per MoE layer; "global": one pool,
      ids `layer_index * E + expert` with `layer_index` the position of the
      layer among the trace's MoE layers, requests ordered by (step, layer).
    initial: the caches before the first step: `{layer: expert ids}` for
      scope "layer", flat ids for "global"; None: empty.

  Returns:
    `{"belady_hit_ratio", "belady_loads", "substitution_bound_hit_ratio",
    "pairs"}`: the pair hit ratio of the optimal schedule, its loads, the
    substitution bound's pair hit ratio, and the pairs of the trace.
  """
  if scope not in SCOPES:
    raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")
  layers, flat = _layer_routing(routing, num_experts)
  if scope == "layer":
    initial = {} if initial is None else dict(initial)
    streams = [([row[layer] for row in flat if layer in row], initial.get(layer, ())) for layer in layers]
  else:
    index = {layer: i for i, layer in enumerate(layers)}
    offset = lambda layer, experts: experts + index[layer] * num_experts
    streams = [
      (
        [(offset(layer, row[layer][0]), row[layer][1]) for row in flat for layer in layers if layer in row],
        () if initial is None else initial,
      )
    ]
  full = [0, 0, 0]  # pair hits, pairs, loads
  sub = [0, 0]
  for stream, init in streams:
    requests = [experts for experts, _ in stream]
    b = belady(requests, num_slots, initial=init, bypass=True, objective="pairs")
    s = substitution_bound(
      [e[top] for e, top in stream],
      [int((~top).sum()) for _, top in stream],
      num_slots,
      initial=init,
      low_requests=[e[~top] for e, top in stream],
      objective="pairs",
    )
    full = [full[0] + b.pair_hits, full[1] + b.pairs, full[2] + b.loads]
    sub = [sub[0] + s.pair_hits, sub[1] + s.pairs]
  ratio = lambda hits, pairs: hits / pairs if pairs else 0.0
  return {
    "belady_hit_ratio": ratio(full[0], full[1]),
    "belady_loads": full[2],
    "substitution_bound_hit_ratio": ratio(*sub),
    "pairs": full[1],
  }
