"""The source-level hierarchy: which components compute a behavior, which pass it on, which
execute it (supplier -> target tracing and validation).

A component that looks important when its *activations* are patched may only aggregate or
route a signal computed upstream; weight patching tells the two apart. `trace_hierarchy`
sorts every component of a granularity into one role, from explicit evidence:

    source       its own donor weights are part of the validated source set: the smallest
                 set of attention and MLP groups whose donor weights, patched into the base
                 together, recover the behavior, each member adding at least `min_gain` of
                 recovery to the rest (leave-one-out inside the set)
    aggregation  (and routing) not a source, at or before the formation layer, a high
                 activation-patching score, and its output's donor behavior is recovered when
                 its suppliers' weights are patched (a `ComponentAnchor` on its output)
    execution    after the formation layer (the signal has formed), not a source, and needed for
                 the behavior to reach the output: ablating its weights in the donor drops the
                 output metric
    inert        none of these

Steps, each a handful of exact sweeps:

1. behavior: weight patching (sweep) and activation patching, both directions, on the metric;
   a component's weight score and activation score are its better direction's effect;
2. validation: every subset of the candidate groups (groups holding a component whose weight
   score reaches `candidate`) is patched as one custom patch in one sweep, the best subset
   net of `min_gain` per group kept; then leave-one-out sweeps inside it until every member
   adds `min_gain`;
3. tracing: targets are the components with a high activation score and the sources; one
   `sweep_matrix` over every upstream supplier (and the sources together) reads every
   target's component anchor at once, and one `activation_matrix` does the same with
   activations; edges keep suppliers whose weights or output recover at least `edge` of a
   target (weights: the signal is computed there; output only: it passes through); the
   strongest weight suppliers become the next level's targets, to `depth` levels;
4. execution: one zero-ablation sweep of the components after the formation layer on the output
   metric.

Each row says why it got its role, and what else could be argued (`also`).
"""

from jaxpatch.hierarchy.roles import (
    HIERARCHY_COLUMNS,
    SOURCES_ROW,
    ComponentRole,
    Edge,
    Hierarchy,
    Thresholds,
    group_of,
    group_of_name,
)
from jaxpatch.hierarchy.tracing import Behavior, TraceSearch, trace_hierarchy

__all__ = ["Thresholds", "TraceSearch", "Behavior", "ComponentRole", "Edge", "Hierarchy",
           "group_of", "group_of_name", "trace_hierarchy", "HIERARCHY_COLUMNS", "SOURCES_ROW"]
