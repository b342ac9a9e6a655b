"""The named modes that signatures take, as `Literal` types with their allowed values.

    Granularity        what one component is: a module, an attention head, an MLP neuron, a
                       whole block (layer)
    ScoredGranularity  the granularities a localization is scored at against a planted set
    Direction          where a patch moves weights: denoise (donor weights into the base),
                       noise (base weights into the donor), zero or mean (ablate the donor's
                       weights towards zero or a mean over reference models)
    PairDirection      the two directions between base and donor (attribution, activation
                       patching)
    AttributionMethod  first-order (the gradient at the start) or integrated gradients
    Positions          where a metric reads: the last prompt token, every prompt token, the
                       donor's continuation, or the positions predicting appended targets
    PatchAt            where a weight patch applies: every position, or only at some token
                       positions (the prompt before its last token, the response: the last
                       prompt token and every token after it, the first response token: the
                       last prompt token alone, or the prompt tokens each prompt marks)
    Role               a component's place in the source-level hierarchy: source, aggregation
                       (and routing), execution, or inert (`jaxpatch.hierarchy`)

Each upper-case tuple lists a type's values in their documented order (for argument parsers
and error messages).
"""

from __future__ import annotations

from typing import Literal, get_args

__all__ = ["Granularity", "ScoredGranularity", "Direction", "PairDirection", "AttributionMethod",
           "Positions", "Role", "GRANULARITIES", "SCORED_GRANULARITIES", "DIRECTIONS", "PAIR_DIRECTIONS",
           "ATTRIBUTION_METHODS", "POSITIONS", "ROLES", "PatchAt", "PATCH_AT", "check_mode"]

Granularity = Literal["module", "head", "neuron", "layer"]
ScoredGranularity = Literal["module", "head", "neuron"]
Direction = Literal["denoise", "noise", "zero", "mean"]
PairDirection = Literal["denoise", "noise"]
AttributionMethod = Literal["first-order", "integrated-gradients"]
Positions = Literal["last", "prompt", "continuation", "targets"]
PatchAt = Literal["everywhere", "prompt", "response", "first-response", "marked"]
Role = Literal["source", "aggregation", "execution", "inert"]

GRANULARITIES: tuple[Granularity, ...] = get_args(Granularity)
SCORED_GRANULARITIES: tuple[ScoredGranularity, ...] = get_args(ScoredGranularity)
DIRECTIONS: tuple[Direction, ...] = get_args(Direction)
PAIR_DIRECTIONS: tuple[PairDirection, ...] = get_args(PairDirection)
ATTRIBUTION_METHODS: tuple[AttributionMethod, ...] = get_args(AttributionMethod)
POSITIONS: tuple[Positions, ...] = get_args(Positions)
ROLES: tuple[Role, ...] = get_args(Role)
PATCH_AT: tuple[PatchAt, ...] = get_args(PatchAt)


def check_mode(what: str, value: object, allowed: tuple[str, ...], error: type[Exception]) -> None:
    """Refuses a mode outside its allowed values, naming the setting and the choices.

    Arguments:
        what: the setting's name in the message ("direction", "granularity", ...).
        value: the value given.
        allowed: the allowed values (one of the tuples above, or a subset).
        error: the error type to raise (a `JaxpatchError` subclass).

    Example:
        >>> from jaxpatch.errors import JaxpatchError
        >>> check_mode("direction", "sideways", PAIR_DIRECTIONS, JaxpatchError)
        Traceback (most recent call last):
        ...
        jaxpatch.errors.JaxpatchError: direction must be one of denoise, noise, got 'sideways'
    """
    if value not in allowed:
        raise error(f"{what} must be one of {', '.join(allowed)}, got {value!r}")
