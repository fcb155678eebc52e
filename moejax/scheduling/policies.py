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

SUBSTITUTIONS = ("score", "similarity", "buddy")
PREFETCHERS = ("provisional", "gate", "activation")
CPU_COMPUTE = ("never", "always", "balance")


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
      (:func:`~moejax.scheduling.routing.buddy_route`), or None.
    prefetch: next-layer prefetching: ``"provisional"`` (the paper's
      predictor: provisional layer output through the next attention and
      gate), ``"gate"`` (next gate on the current hidden state),
      ``"activation"`` (most activated experts so far), or None.
    balance: split misses between loading and CPU computation with the
      two-pointer rule (:func:`~moejax.scheduling.balance.split_load_cpu`).
      True exactly when ``cpu_compute == "balance"``.
    cpu_compute: misses computed on the CPU ``"never"`` (all loaded),
      ``"always"`` (none loaded), or as ``"balance"`` decides.
    static: a fixed resident set chosen from calibration activation
      counts, never changed; everything else runs on the CPU.
    layerwise: each layer's experts are all streamed in before it runs.
    cache_prior: router logits biased toward resident experts before top-k
      (:func:`~moejax.scheduling.routing.cache_prior_logits`).
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

  def __post_init__(self):
    _check_choice("eviction", self.eviction, EVICTION_POLICIES, True)
    _check_choice("substitution", self.substitution, SUBSTITUTIONS, True)
    _check_choice("prefetch", self.prefetch, PREFETCHERS, True)
    _check_choice("cpu_compute", self.cpu_compute, CPU_COMPUTE, False)
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
