"""LLaMA Pro block expansion: plan (where new blocks go) and apply (an expanded checkpoint source)."""

from megatron_llamapro.expansion.plan import (  # noqa: F401
    EXPLICIT, PLACEMENTS, ExpansionPlan, PlanError, check_balance, interleaved_positions,
    parse_positions, plan_expansion, plan_from_positions,
)


def __getattr__(name):
    # apply.py brings every checkpoint reader; import it only when asked so planning needs only plan.py.
    import importlib

    if name.startswith("__"):
        raise AttributeError(name)
    apply = importlib.import_module("megatron_llamapro.expansion.apply")
    if name == "apply":
        return apply
    try:
        return getattr(apply, name)
    except AttributeError:
        raise AttributeError(f"module 'megatron_llamapro.expansion' has no attribute {name!r}") from None


__all__ = [
    "EXPLICIT", "PLACEMENTS", "ExpansionPlan", "PlanError", "check_balance", "interleaved_positions",
    "parse_positions", "plan_expansion", "plan_from_positions",
    # from apply.py (lazy):
    "ExpandedSource", "compare_logits", "expand_checkpoint", "expanded_manifest",
    "expanded_source_factory", "expansion_record", "model_logits", "open_expanded",
]
