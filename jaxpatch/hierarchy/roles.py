"""The hierarchy's vocabulary and its rules: the thresholds, one component's evidence and role,
the supplier -> target edges, the `Hierarchy` a trace returns, and the rule that turns a
component's evidence into its role (`role_of`)."""

from __future__ import annotations

import csv
import dataclasses
import io
from typing import Any, Sequence

from jaxpatch.components import Component
from jaxpatch.modes import Role
from jaxpatch.results import ScoreMatrix

__all__ = ["Thresholds", "ComponentRole", "Edge", "Hierarchy", "HIERARCHY_COLUMNS", "SOURCES_ROW",
           "group_of", "group_of_name", "role_of"]

HIERARCHY_COLUMNS = ("component", "layer", "class", "weight_score", "activation_score",
                     "supplied", "execution", "gain", "reason", "also")
SOURCES_ROW = "all sources"


@dataclasses.dataclass(frozen=True)
class Thresholds:
    """The thresholds a role is decided by (all on the recovery scale: 0 base, 1 donor).

    Attributes:
        candidate: a group is searched for sources when one of its components' weight score
            reaches this.
        min_gain: a validated group, and each source inside it, must add at least this much
            recovery to the rest of the set.
        activation: a high activation-patching score.
        supplied: aggregation needs its output anchor recovered at least this much by its
            suppliers' weights.
        execution: execution needs the output metric to drop at least this much when its
            weights are ablated in the donor.
        edge: a supplier -> target edge is kept when the supplier's weights alone, or its
            output activation alone, recover at least this much of the target's output anchor.

    Example:
        >>> Thresholds().min_gain
        0.02
    """

    candidate: float = 0.1
    min_gain: float = 0.02
    activation: float = 0.3
    supplied: float = 0.5
    execution: float = 0.3
    edge: float = 0.1


@dataclasses.dataclass
class ComponentRole:
    """One component's evidence and role.

    Attributes:
        component: its name; layer: its block (-1 embeddings, n_layers final modules).
        role: source, aggregation, execution or inert.
        weight_score, activation_score: the better direction's effect of patching its weights
            and its output activation on the metric.
        supplied: how much of its output anchor its suppliers' weights recover (the best of
            all sources together and any single supplier); None when it was not traced.
        execution: the output metric's drop when its weights are ablated in the donor; None
            when it lies at or before the formation layer.
        gain: for members of the chosen groups, the recovery its donor weights add to the rest
            of the set (a source when at least `min_gain`); None outside them.
        reason: which scores crossed which thresholds.
        also: what else could be argued about it (empty when nothing).
    """

    component: str
    layer: int
    role: Role
    weight_score: float
    activation_score: float
    supplied: float | None
    execution: float | None
    gain: float | None
    reason: str
    also: str = ""


@dataclasses.dataclass(frozen=True)
class Edge:
    """A supplier -> target edge: patching the supplier's weights alone recovers `score` of the
    target's output anchor (`activation_score`: patching the supplier's output activation).

    An edge is kept when either score reaches `Thresholds.edge`: a high weight score says the
    signal is computed in the supplier's weights; a high activation score with a low weight
    score says the supplier's output only carries (passes through) a signal computed upstream.

    Attributes:
        supplier, target: component names (`supplier` may be "all sources").
        score, activation_score: recoveries of the target's output anchor.
        level: the expansion level it was found at (1 = the behavior's own components).
    """

    supplier: str
    target: str
    score: float
    activation_score: float | None
    level: int


@dataclasses.dataclass(kw_only=True)
class Hierarchy:
    """What `trace_hierarchy` found: one role per component, and the supplier graph.

    Attributes:
        rows: every component's evidence and role, in component order.
        edges: the supplier -> target edges.
        matrices: the tracing matrices by level (weights and activations).
        sources_recovery: the recovery of the validated source set patched together.
        formation_layer: where the signal counts as formed (aggregation at or before it,
            execution after it).
        settings: metric names, granularity, thresholds, depth.
        calls: how many sweeps of each kind ran, and how many candidate runs in all.
        timing: seconds per step.

    Example:
        >>> from jaxpatch.examples import chain_pair
        >>> chain = chain_pair()
        >>> h = jaxpatch.trace_hierarchy(jaxpatch.prepare(chain.base, chain.donor, chain.batch),
        ...                              jaxpatch.LogProb(), formation_layer=1,
        ...                              search=jaxpatch.TraceSearch(depth=1))
        >>> h.role("layers.0.mlp.down_proj"), h.with_role("source")
        ('source', ['layers.0.mlp.down_proj'])
        >>> h.to_csv().splitlines()[0]
        'component,layer,class,weight_score,activation_score,supplied,execution,gain,reason,also'
        >>> sorted(h.graph())[:3], h.graph()["edges"][0]["supplier"]
        (['calls', 'edges', 'format'], 'layers.0.mlp.down_proj')
    """

    rows: list[ComponentRole]
    edges: list[Edge]
    matrices: dict[str, ScoreMatrix]
    sources_recovery: float
    formation_layer: int
    settings: dict[str, Any]
    calls: dict[str, int]
    timing: dict[str, float]

    def role(self, name: str) -> Role:
        """The role of one component."""
        return next(r.role for r in self.rows if r.component == name)

    def with_role(self, role: Role) -> list[str]:
        """The components given `role`, in component order."""
        return [r.component for r in self.rows if r.role == role]

    def to_csv(self) -> str:
        """The table as CSV (`HIERARCHY_COLUMNS`)."""
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(HIERARCHY_COLUMNS)
        for r in self.rows:
            writer.writerow([r.component, r.layer, r.role, _fmt(r.weight_score),
                             _fmt(r.activation_score), _fmt(r.supplied), _fmt(r.execution),
                             _fmt(r.gain), r.reason, r.also])
        return out.getvalue()

    def graph(self) -> dict[str, Any]:
        """The graph as a JSON document: `{"nodes": [...], "edges": [...]}` plus settings."""
        nodes = [{"name": r.component, "class": r.role, "layer": r.layer,
                  "weight_score": r.weight_score, "activation_score": r.activation_score,
                  "supplied": r.supplied, "execution": r.execution, "gain": r.gain,
                  "reason": r.reason, "also": r.also} for r in self.rows]
        edges = [{"supplier": e.supplier, "target": e.target, "score": e.score,
                  "activation_score": e.activation_score, "level": e.level} for e in self.edges]
        return {"format": "jaxpatch.hierarchy/2", "nodes": nodes, "edges": edges,
                "sources_recovery": self.sources_recovery,
                "formation_layer": self.formation_layer,
                "settings": self.settings, "calls": self.calls, "timing": self.timing}


def _fmt(value: float | None) -> str:
    return "" if value is None else f"{value:.6g}"


def group_of(component: Component) -> str:
    """The group a component belongs to in the source search: the attention or the MLP of its
    block, or the component itself (norms, embeddings, final modules, whole blocks).

    Example:
        >>> from jaxpatch.components import components
        >>> [group_of(c) for c in components(cfg, "head")[:1] + components(cfg, "module")[:3]]
        ['layers.0.self_attn', 'embed_tokens', 'layers.0.input_layernorm', 'layers.0.self_attn']
    """
    return group_of_name(component.name)



def _suppliers_text(edges: Sequence[Edge], target: str, minimum: float, k: int = 3) -> str:
    """The strongest single weight suppliers of a target, as text."""
    top = sorted((e for e in edges if e.target == target and e.supplier != SOURCES_ROW
                  and e.score >= minimum), key=lambda e: -e.score)[:k]
    return ", ".join(f"{e.supplier} {e.score:.2f}" for e in top) or "none above the edge threshold"


def _layer_of(name: str) -> int:
    parts = name.split("[")[0].split(".")
    if parts[0] == "layers":
        return int(parts[1])
    return -1 if parts[0].startswith("embed") else 1 << 30


def group_of_name(name: str) -> str:
    """`group_of` from a component's name.

    Example:
        >>> group_of_name("layers.2.mlp[neuron=5]"), group_of_name("norm")
        ('layers.2.mlp', 'norm')
    """
    parts = name.split("[")[0].split(".")
    if len(parts) >= 3 and parts[0] == "layers" and parts[2] in ("self_attn", "mlp"):
        return ".".join(parts[:3])
    return name


def role_of(c: Component, weight: float, activation: float, gains: dict[str, float],
          left_out: float | None, supplied: float | None, execution: float | None, formed: int,
          thresholds: Thresholds, edges: Sequence[Edge]) -> ComponentRole:
    """One component's role from its evidence, with the reason and what else could be argued
    (the rules of `jaxpatch.hierarchy`'s module docstring).

    Arguments:
        c: the component.
        weight, activation: its better direction's weight- and activation-patching effects.
        gains: the validated sources' gains (name -> recovery its donor weights add).
        left_out: its gain when its group was chosen but it added too little (else None).
        supplied: how much of its output its suppliers' weights recover (None: not traced).
        execution: the output metric's drop when its weights are ablated (None: at or before
            the formation layer).
        formed: the formation layer.
        thresholds: the role thresholds.
        edges: the supplier -> target edges (for the reasons).

    Returns:
        A `ComponentRole`.

    Example:
        >>> from jaxpatch.components import components
        >>> mlp = components(cfg, "module")[-4]
        >>> r = role_of(mlp, 0.05, 0.0, {}, None, None, 0.6, 0, Thresholds(), [])
        >>> r.component, r.role
        ('layers.1.mlp.up_proj', 'execution')
    """
    t = thresholds
    joint = next((e.score for e in edges if e.target == c.name and e.supplier == SOURCES_ROW), None)
    also: list[str] = []
    gain = gains.get(c.name)
    if gain is not None:
        role: Role = "source"
        reason = (f"in the validated source set: without its donor weights the set recovers "
                  f"{gain:.2f} less (>= {t.min_gain}); own weight score {weight:.2f}")
        if gain < t.min_gain:  # no member of the chosen groups adds min_gain alone
            reason = (f"in the validated source set, whose groups recover the behavior together; "
                      f"alone it adds only {gain:.4f} (< {t.min_gain}): the set's members stand "
                      f"in for each other; own weight score {weight:.2f}")
        if activation >= t.activation and supplied is not None and supplied >= t.supplied:
            also.append(f"also passes on upstream signal: its suppliers recover {supplied:.2f} "
                        f"of its output ({_suppliers_text(edges, c.name, t.edge)})")
        if execution is not None and execution >= t.execution:
            also.append(f"also needed downstream: ablating it drops the output {execution:.2f}")
    elif (c.layer <= formed and activation >= t.activation and supplied is not None
          and supplied >= t.supplied):
        role = "aggregation"
        upstream = sorted({group_of_name(n) for n in gains if _layer_of(n) <= c.layer})
        via = (f"the sources in {', '.join(upstream)} together {joint:.2f}; "
               if joint is not None else "")
        reason = (f"activation score {activation:.2f} >= {t.activation} but not a source "
                  f"(weight score {weight:.2f}); its suppliers' weights recover {supplied:.2f} "
                  f">= {t.supplied} of its output ({via}strongest: "
                  f"{_suppliers_text(edges, c.name, t.edge)})")
    elif execution is not None and execution >= t.execution:
        role = "execution"
        reason = (f"after the formation layer {formed}; ablating its weights drops the output "
                  f"{execution:.2f} >= {t.execution}; not a source (weight score {weight:.2f})")
        if activation >= t.activation:
            also.append(f"its output carries the signal too (activation score {activation:.2f})")
    else:
        role = "inert"
        parts = [f"not a source (weight score {weight:.2f})" if left_out is None else
                 f"not a source: its group is in the validated set, but its donor weights add "
                 f"only {left_out:.4f} < {t.min_gain} to the rest (weight score {weight:.2f})"]
        if activation >= t.activation:
            parts.append(f"activation score {activation:.2f} is high but its output is "
                         + ("not traced" if supplied is None
                            else f"recovered only {supplied:.2f} < {t.supplied} by its suppliers"))
        else:
            parts.append(f"activation score {activation:.2f} < {t.activation}")
        if execution is not None:
            parts.append(f"ablating it drops the output {execution:.2f} < {t.execution}")
        reason = "; ".join(parts)
    if role != "source" and weight >= t.candidate:
        also.append(f"its own weights score {weight:.2f} alone, but the validated source set "
                    "does not need them")
    return ComponentRole(c.name, c.layer, role, weight, activation, supplied, execution,
                         gain if gain is not None else left_out, reason, "; ".join(also))

