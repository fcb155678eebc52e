"""Named scheduling policies as combinations of switchable components.

A policy is data, not code: a frozen :class:`PolicySpec` saying which
component the engine switches on for each scheduling decision. The engine
reads the spec; experiments pick one by name and may switch a component with
``dataclasses.replace(get_policy("smoe"), prefetch="gate", name="smoe-gate")``.

The registered policies are the baselines of SPEC section 8 and the paper's
cumulative ablation ``cpu -> +ce -> +cr -> +pre -> +ba`` (``+ba`` has the
components of ``smoe``).
"""

from __future__ import annotations

import dataclasses
import types

from moejax.scheduling.cache import EVICTION_POLICIES

SUBSTITUTIONS = ("score", "similarity", "buddy", "release")
PREFETCHERS = ("provisional", "gate", "activation", "layernorm")
CPU_COMPUTE = ("never", "always", "balance", "greedy")
CACHE_SCOPES = ("layer", "global")
FILLS = ("empty", "layer_order")


def _check_choice(field: str, value, choices, allow_none: bool) -> None:
  if value is None and allow_none:
    return
  if value not in choices:
    none = " or None" if allow_none else ""
    raise ValueError(f"PolicySpec.{field} must be one of {choices}{none} (got {value!r}).")


@dataclasses.dataclass(frozen=True)
class PolicySpec:
  """Which scheduling component is on, for one named policy.

  Attributes:
    name: registry name.
    cache: True: routed experts live on the host and each layer has a
      bounded device expert cache. False: every expert resident on the
      device, no offloading (the upper bound).
    eviction: how the cache admits and evicts on a miss (one of
      :data:`moejax.scheduling.cache.EVICTION_POLICIES`), or None for a
      cache that is never updated dynamically.
    substitution: ``"score"`` (the expert-cache router,
      :func:`~moejax.scheduling.routing.route`), ``"similarity"`` (the same
      rule with candidates ranked by a similarity matrix), ``"buddy"``
      (:func:`~moejax.scheduling.routing.buddy_route`), ``"release"`` (the
      paper's released code: :func:`~moejax.scheduling.routing.release_route`),
      or None.
    prefetch: next-layer prefetching: ``"provisional"`` (the paper's
      predictor: provisional layer output through the next attention and
      gate), ``"gate"`` (next gate on the current hidden state),
      ``"activation"`` (most activated experts so far), ``"layernorm"`` (the
      released code's: the next layer's norms and gate on the MoE input plus
      the shared experts' output, no attention), or None.
    prefetch_limit: most experts one prefetch copies, the first predicted
      ones by expert id (:func:`~moejax.scheduling.prefetch.limited_targets`);
      None: every predicted top-score expert.
    prefetch_after_miss: prefetch for a layer only when the layer before it
      had a miss (a demand load or a CPU expert), as the released code does.
    balance: split misses between loading and CPU computation with the
      two-pointer rule (:func:`~moejax.scheduling.balance.split_load_cpu`).
      True exactly when ``cpu_compute == "balance"``.
    cpu_compute: misses computed on the CPU ``"never"`` (all loaded),
      ``"always"`` (none loaded), or as ``"balance"`` (two pointers, SPEC
      section 6) or ``"greedy"`` (the released code's CPU-first rule,
      :func:`~moejax.scheduling.balance.greedy_split_load_cpu`) decides.
    static: a fixed resident set chosen from calibration activation
      counts, never changed; everything else runs on the CPU.
    layerwise: each layer's experts are all streamed in before it runs.
    cache_prior: router logits biased toward resident experts before top-k
      (:func:`~moejax.scheduling.routing.cache_prior_logits`).
    cache_scope: ``"layer"`` (slots per MoE layer) or ``"global"`` (one pool
      of slots for every MoE layer, eviction among all of them).
    fill: what the slots hold before the first prompt: ``"empty"``, or
      ``"layer_order"`` (every expert of the first MoE layer, then the next,
      until the slots are full: the released code's start).
    renormalize: renormalise the final k experts' weights to sum to one
      whatever the checkpoint's ``norm_topk_prob`` (the released code does so
      for DeepSeek-MoE and XVERSE); then even alpha = 0 differs from the
      model there. Off unless asked for.
    alpha: the alpha the policy was published with; the engine uses it
      when given no alpha (None: 0, the exact model).
  """

  name: str
  cache: bool = True
  eviction: str | None = None
  substitution: str | None = None
  prefetch: str | None = None
  balance: bool = False
  cpu_compute: str = "never"
  static: bool = False
  layerwise: bool = False
  cache_prior: bool = False
  cache_scope: str = "layer"
  fill: str = "empty"
  prefetch_limit: int | None = None
  prefetch_after_miss: bool = False
  renormalize: bool = False
  alpha: float | None = None

  @property
  def split_costs(self) -> bool:
    """Whether misses are split between loads and the CPU by per-expert costs ("balance", "greedy")."""
    return self.cpu_compute in ("balance", "greedy")

  def __post_init__(self):
    _check_choice("eviction", self.eviction, EVICTION_POLICIES, True)
    _check_choice("substitution", self.substitution, SUBSTITUTIONS, True)
    _check_choice("prefetch", self.prefetch, PREFETCHERS, True)
    _check_choice("cpu_compute", self.cpu_compute, CPU_COMPUTE, False)
    _check_choice("cache_scope", self.cache_scope, CACHE_SCOPES, False)
    _check_choice("fill", self.fill, FILLS, False)
    if self.prefetch is None and (self.prefetch_limit is not None or self.prefetch_after_miss):
      raise ValueError(f"policy {self.name!r}: prefetch_limit and prefetch_after_miss need a prefetch predictor.")
    if self.prefetch_limit is not None and self.prefetch_limit < 1:
      raise ValueError(f"policy {self.name!r}: prefetch_limit must be >= 1 or None (got {self.prefetch_limit}).")
    if self.alpha is not None and not self.alpha >= 0:
      raise ValueError(f"policy {self.name!r}: alpha must be >= 0 or None (got {self.alpha}).")
    if self.balance != (self.cpu_compute == "balance"):
      raise ValueError(
        f"policy {self.name!r}: balance=True goes with "
        "cpu_compute='balance' (and balance=False with 'never' or "
        "'always'); switch both together."
      )
    if not self.cache:
      if any(getattr(self, f.name) != f.default for f in dataclasses.fields(self) if f.name not in ("name", "cache")):
        raise ValueError(
          f"policy {self.name!r}: cache=False keeps every expert resident, so every other component must be off."
        )
      return
    if self.static and self.layerwise:
      raise ValueError(f"policy {self.name!r}: static and layerwise are exclusive; choose one.")
    if (self.static or self.layerwise) and (self.eviction or self.prefetch):
      raise ValueError(
        f"policy {self.name!r}: a static or layerwise policy has no dynamic cache; set eviction=None and prefetch=None."
      )
    if self.static and self.cpu_compute != "always":
      raise ValueError(
        f"policy {self.name!r}: the static resident set never "
        "changes, so misses run on the CPU; set cpu_compute='always'."
      )
    if self.layerwise and (self.cpu_compute != "never" or self.substitution):
      raise ValueError(
        f"policy {self.name!r}: a layerwise policy streams every "
        "expert, so nothing is missed; set cpu_compute='never' and "
        "substitution=None."
      )
    if self.layerwise and (self.cache_scope != "layer" or self.fill != "empty"):
      raise ValueError(f"policy {self.name!r}: a layerwise policy keeps no slots; leave cache_scope and fill alone.")
    loads = self.cpu_compute != "always" or self.prefetch is not None
    if loads and self.eviction is None and not self.layerwise:
      raise ValueError(
        f"policy {self.name!r} loads experts into the cache but has "
        f"no eviction policy; set eviction to one of "
        f"{EVICTION_POLICIES} or cpu_compute='always'."
      )


def _registry(*specs: PolicySpec) -> types.MappingProxyType:
  return types.MappingProxyType({spec.name: spec for spec in specs})


_CE = PolicySpec("+ce", eviction="score")
_CR = dataclasses.replace(_CE, name="+cr", substitution="score")
_PRE = dataclasses.replace(_CR, name="+pre", prefetch="provisional")
_BA = dataclasses.replace(_PRE, name="+ba", balance=True, cpu_compute="balance")

_RELEASE = PolicySpec(
  "smoe_release",
  eviction="fifo",
  substitution="release",
  prefetch="layernorm",
  prefetch_limit=1,
  prefetch_after_miss=True,
  cpu_compute="greedy",
  cache_scope="global",
  fill="layer_order",
  alpha=0.25,
)
"""The paper's released code (GitHub goingshr/SMoE) as components; docs/smoe_release.md lists each rule."""

POLICIES = _registry(
  PolicySpec("resident", cache=False),
  PolicySpec("cpu", cpu_compute="always"),
  PolicySpec("static", static=True, cpu_compute="always"),
  PolicySpec("layerwise", layerwise=True),
  PolicySpec("lru", eviction="lru"),
  PolicySpec("lfu", eviction="lfu", prefetch="activation"),
  PolicySpec("mrs", eviction="mrs", balance=True, cpu_compute="balance"),
  PolicySpec("cache_prior", eviction="lru", cache_prior=True),
  PolicySpec("buddy", eviction="lru", substitution="buddy"),
  dataclasses.replace(_BA, name="smoe"),
  _RELEASE,
  _CE,
  _CR,
  _PRE,
  _BA,
)
"""Registered policies by name (read-only mapping)."""

ABLATION = ("cpu", "+ce", "+cr", "+pre", "+ba")
"""The paper's cumulative ablation, in order."""


def get_policy(name: str) -> PolicySpec:
  """The registered :class:`PolicySpec` called ``name`` (case-insensitive)."""
  try:
    return POLICIES[name.lower()]
  except KeyError:
    raise ValueError(f"unknown policy {name!r}; choose one of {tuple(POLICIES)}.") from None
