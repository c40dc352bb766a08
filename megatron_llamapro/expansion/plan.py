"""Where the new blocks of a LLaMA Pro expansion go, and which layer each one copies (no tensors).

One rule gives every new block its source, whatever the placement:
    a new block copies the nearest ORIGINAL layer below it (layer 0 when none is below it).
Placements only choose the 0-based positions of the new blocks in the expanded model of
L' = L + P layers:

interleaved (default, the paper)
    The L original layers are split into P groups of consecutive layers; a copy of each group's
    last layer goes right after it. Group g (0-based) holds original layers
        floor(g * L / P)  ...  floor((g + 1) * L / P) - 1,
    so group sizes differ by at most one and, when L is not a multiple of P, the larger groups are
    spread evenly (the last group is always one of the larger ones): L=10, P=4 -> sizes 2, 3, 2, 3.
    L=32, P=8 -> new blocks at 4, 9, 14, ..., 39, copies of 3, 7, 11, ..., 31.
    This rule makes the expansion balance over C = PP x VPP pipeline chunks exactly when C divides
    both L and P; then chunk boundaries fall on group boundaries, so every chunk of the expanded
    model is built from the matching chunk of the original alone (shard-local). Needs P <= L.
top
    All P new blocks stacked after layer L-1 (positions L ... L+P-1), every one a copy of layer L-1
    (the paper's "top" ablation: the model's last layer repeated P times, each an identity).
bottom
    All P new blocks before layer 0 (positions 0 ... P-1), every one a copy of layer 0.
explicit (--new-block-positions i,j,...)
    The given positions in the expanded model, each copying the nearest original layer below it.

Stage balance, checked for the target pipeline layout: every (stage, virtual chunk) must hold the
same number of layers (PP x VPP divides L'), and for interleaved also the same number of new blocks.
A plan that cannot be balanced is refused with a `PlanError` of one line that lists the pipeline
sizes and block counts that would work.
"""

from __future__ import annotations

from dataclasses import dataclass

from megatron_llamapro.checkpoint.layout import Layout, StagePlacement
from megatron_llamapro.errors import UserError

PLACEMENTS = ("interleaved", "top", "bottom")
EXPLICIT = "explicit"


class PlanError(UserError):
    """An expansion that cannot be planned; the message is one line and says what would work."""


@dataclass(frozen=True)
class ExpansionPlan:
    """The expanded model, layer by layer.

    origins[i]  the original layer that expanded layer i comes from (itself, renumbered, for an
                original layer; the copied layer for a new block)
    new[i]      whether expanded layer i is a new (identity-initialised) block
    """

    original_num_layers: int
    origins: tuple[int, ...]
    new: tuple[bool, ...]
    placement: str

    @property
    def num_layers(self) -> int:
        return len(self.origins)

    @property
    def num_new(self) -> int:
        return sum(self.new)

    @property
    def new_layers(self) -> list[int]:
        """Global 0-based indices of the new blocks in the expanded model."""
        return [i for i, is_new in enumerate(self.new) if is_new]

    @property
    def sources(self) -> dict[int, int]:
        """New block index (expanded model) -> the original layer it copies."""
        return {i: self.origins[i] for i in self.new_layers}

    @property
    def renumbering(self) -> list[int]:
        """renumbering[j] = index in the expanded model of original layer j."""
        out = [0] * self.original_num_layers
        for i, (origin, is_new) in enumerate(zip(self.origins, self.new)):
            if not is_new:
                out[origin] = i
        return out

    # ---- pipeline view --------------------------------------------------------------------
    def chunks(self, pp: int = 1, vpp: int | None = None) -> list[tuple[int, int, list[int]]]:
        """(stage, virtual chunk, global layers) of the expanded model under megatron-core's default
        placement (checkpoint.layout.StagePlacement). Raises PlanError if the layout does not divide L'."""
        layout = Layout(pp=pp, vpp=vpp)
        if not layout.divides(self.num_layers):
            raise PlanError(f"{_layout(pp, vpp)} does not divide {self.num_layers} layers")
        placement = StagePlacement(self.num_layers, layout)
        return [(s, k, placement.layers(s, k)) for s, k in placement.units()]

    def balance_problem(self, pp: int = 1, vpp: int | None = None) -> str | None:
        """None if the plan balances over the layout, else what is unequal."""
        if not Layout(pp=pp, vpp=vpp).divides(self.num_layers):
            return "layers"
        if self.placement == "interleaved":
            counts = {sum(self.new[i] for i in layers) for _, _, layers in self.chunks(pp, vpp)}
            if len(counts) > 1:
                return "new blocks"
        return None

    def shard_local(self, pp: int = 1, vpp: int | None = None) -> bool:
        """True when each (stage, chunk) of the expanded model draws only on the same (stage, chunk)
        of the original model laid out with the same PP/VPP (so each output shard of a legacy
        checkpoint is written from its matching input shard alone)."""
        layout = Layout(pp=pp, vpp=vpp)
        if not (layout.divides(self.num_layers) and layout.divides(self.original_num_layers)):
            return False
        original = StagePlacement(self.original_num_layers, layout)
        return all(original.locate(self.origins[i])[:2] == (s, k)
                   for s, k, layers in self.chunks(pp, vpp) for i in layers)

    def stages_without_new_blocks(self, pp: int = 1, vpp: int | None = None) -> list[int]:
        """Pipeline stages holding none of the new blocks, laid out as the trainer lays them out."""
        return StagePlacement(self.num_layers, Layout(pp=pp, vpp=vpp)).stages_without(self.new_layers)

    def describe(self, pp: int = 1, vpp: int | None = None) -> str:
        """The plan per pipeline stage / virtual chunk, for --dry-run."""
        lines = [f"expansion plan: {self.original_num_layers} -> {self.num_layers} layers, "
                 f"{self.num_new} new blocks ({self.placement}), pipeline {_layout(pp, vpp)}"]
        for s, k, layers in self.chunks(pp, vpp):
            where = f"stage {s}" + (f" chunk {k}" if vpp else "")
            originals = [self.origins[i] for i in layers if not self.new[i]]
            new = [f"{i} (copy of {self.origins[i]})" for i in layers if self.new[i]]
            lines.append(f"  {where}: layers {_ranges(layers)}; original layers {_ranges(originals) or '-'}; "
                         f"new: {', '.join(new) or '-'}")
        lines.append("  new blocks copy every weight of their source layer except the attention and MLP "
                     "output projections, which are zero (identity blocks)")
        if self.shard_local(pp, vpp):
            lines.append("  shard-local: each output stage/chunk is built from the same input stage/chunk alone")
        return "\n".join(lines)


# ---- building plans --------------------------------------------------------------------------

def interleaved_positions(num_layers: int, num_new: int) -> list[int]:
    """Positions of the new blocks for the interleaved placement (see the module docstring)."""
    ends = [(g + 1) * num_layers // num_new for g in range(num_new)]  # originals up to group g's end
    return [end + g for g, end in enumerate(ends)]


def positions_for(num_layers: int, num_new: int, placement: str) -> list[int]:
    if placement == "interleaved":
        if num_new > num_layers:
            raise PlanError(f"interleaved placement puts at most one new block per original layer: "
                            f"{num_new} new blocks > {num_layers} layers")
        return interleaved_positions(num_layers, num_new)
    if placement == "top":
        return list(range(num_layers, num_layers + num_new))
    if placement == "bottom":
        return list(range(num_new))
    raise PlanError(f"unknown placement {placement!r} (choose from {', '.join(PLACEMENTS)})")


def plan_from_positions(num_layers: int, positions: list[int], placement: str = EXPLICIT) -> ExpansionPlan:
    """A plan with new blocks at the given 0-based positions of the expanded model."""
    if num_layers < 1:
        raise PlanError(f"cannot expand a model of {num_layers} layers")
    if not positions:
        raise PlanError("no new blocks to add (need at least 1)")
    if len(set(positions)) != len(positions):
        dup = sorted({p for p in positions if positions.count(p) > 1})
        raise PlanError(f"new block positions repeat: {', '.join(map(str, dup))}")
    total = num_layers + len(positions)
    bad = [p for p in positions if not 0 <= p < total]
    if bad:
        raise PlanError(f"new block positions {', '.join(map(str, bad))} out of range: with "
                        f"{len(positions)} new blocks the expanded model has layers 0..{total - 1}")
    wanted = set(positions)
    origins, new = [], []
    next_original = 0
    for i in range(total):
        if i in wanted:
            origins.append(max(next_original - 1, 0))  # nearest original layer below, else layer 0
            new.append(True)
        else:
            origins.append(next_original)
            new.append(False)
            next_original += 1
    return ExpansionPlan(num_layers, tuple(origins), tuple(new), placement)


def _layout(pp: int, vpp: int | None) -> str:
    return f"PP={pp}" + (f" VPP={vpp}" if vpp else "")


def _ranges(values: list[int]) -> str:
    parts, start, prev = [], None, None
    for v in values:
        if start is None:
            start = prev = v
        elif v == prev + 1:
            prev = v
        else:
            parts.append(f"{start}" if start == prev else f"{start}-{prev}")
            start = prev = v
    if start is not None:
        parts.append(f"{start}" if start == prev else f"{start}-{prev}")
    return ",".join(parts)


def _set(values: list[int], limit: int = 12) -> str:
    if not values:
        return "{} (none)"
    shown = ", ".join(map(str, values[:limit]))
    return "{" + shown + (", ..." if len(values) > limit else "") + "}"


def _balances(num_layers: int, num_new: int, placement: str, pp: int, vpp: int | None) -> bool:
    try:
        plan = plan_from_positions(num_layers, positions_for(num_layers, num_new, placement), placement)
    except PlanError:
        return False
    return plan.balance_problem(pp, vpp) is None


def _refusal(plan: ExpansionPlan, pp: int, vpp: int | None, problem: str) -> PlanError:
    L, P, total = plan.original_num_layers, plan.num_new, plan.num_layers
    layout = _layout(pp, vpp)
    chunks = Layout(pp=pp, vpp=vpp).num_chunks
    if plan.placement == "interleaved":
        rule = (f"interleaved expansion needs every pipeline chunk to hold the same number of layers and "
                f"of new blocks, i.e. {'PP x VPP' if vpp else 'PP'} = {chunks} must divide both {L} and {P}")
    elif problem == "layers":
        rule = (f"every pipeline chunk needs the same number of layers, so PP x VPP = {chunks} must divide "
                f"{total}" if vpp else f"every pipeline stage needs the same number of layers, so PP must "
                f"divide {total}")
    else:
        rule = f"every pipeline chunk needs the same number of {problem}"
    what = "these new block positions" if plan.placement == EXPLICIT else f"{P} new blocks"
    min_pp = 2 if vpp else 1
    if plan.placement == EXPLICIT:
        good_pp = [p for p in range(min_pp, total + 1) if Layout(pp=p, vpp=vpp).divides(total)]
        good_p = [n for n in range(1, L + 1) if Layout(pp=pp, vpp=vpp).divides(L + n)]
        placement = "explicit"
    else:
        placement = plan.placement
        good_pp = [p for p in range(min_pp, total + 1) if _balances(L, P, placement, p, vpp)]
        good_p = [n for n in range(1, L + 1) if _balances(L, n, placement, pp, vpp)]
    at_v = f" (at VPP={vpp})" if vpp else ""
    msg = (f"cannot balance {L} layers + {P} new blocks ({placement}) over {layout}: {rule}; "
           f"with {what} use PP in {_set(good_pp)}{at_v}; with {layout} use a number of new blocks in "
           f"{_set(good_p)}")
    if vpp and plan.placement != EXPLICIT:
        good_v = [x for x in range(2, total + 1) if _balances(L, P, placement, pp, x)]
        if good_v:
            msg += f"; with {P} new blocks at PP={pp} use VPP in {_set(good_v)}"
    return PlanError(msg)


def plan_expansion(num_layers: int, num_new: int | None = None, placement: str = "interleaved",
                   positions: list[int] | None = None, pp: int = 1, vpp: int | None = None) -> ExpansionPlan:
    """Plan an expansion of `num_layers` original layers and check it balances over PP/VPP.

    Either `num_new` with a `placement` (interleaved | top | bottom), or explicit `positions`
    (0-based indices in the expanded model; `num_new`, if also given, must equal their count).
    """
    if pp < 1 or (vpp is not None and vpp < 1):
        raise PlanError(f"pipeline sizes must be >= 1 (PP={pp}, VPP={vpp})")
    if vpp == 1:
        vpp = None
    if vpp is not None and pp < 2:
        raise PlanError(f"VPP={vpp} needs PP of at least 2")
    if num_layers < 1:
        raise PlanError(f"cannot expand a model of {num_layers} layers")
    if positions is not None:
        if num_new is not None and num_new != len(positions):
            raise PlanError(f"--num-new-blocks {num_new} but {len(positions)} positions given")
        plan = plan_from_positions(num_layers, sorted(positions), EXPLICIT)
    else:
        if num_new is None or num_new < 1:
            raise PlanError(f"the number of new blocks must be at least 1 (got {num_new})")
        plan = plan_from_positions(num_layers, positions_for(num_layers, num_new, placement), placement)
    check_balance(plan, pp, vpp)
    return plan


def check_balance(plan: ExpansionPlan, pp: int = 1, vpp: int | None = None) -> None:
    """Raise the one-line PlanError (with the sizes that would work) if `plan` does not balance."""
    if vpp == 1:
        vpp = None
    problem = plan.balance_problem(pp, vpp)
    if problem is not None:
        raise _refusal(plan, pp, vpp, problem)


def untrained_stage_warning(plan: ExpansionPlan, pp: int = 1, vpp: int | None = None) -> str | None:
    """The one warning line for a plan that leaves pipeline stages without a new block (top or
    bottom placement, or explicit positions, at PP > 1): the trainer, which trains only the new
    blocks by default, refuses to save such a layout (training.plan.check_every_stage_trains)."""
    if vpp == 1:
        vpp = None
    empty = plan.stages_without_new_blocks(pp, vpp)
    if pp == 1 or not empty:
        return None
    holding = [s for s in range(pp) if s not in empty]
    how = (f"--new-block-positions {','.join(map(str, plan.new_layers))}" if plan.placement == EXPLICIT
           else f"--placement {plan.placement}")
    layout = f"--pp {pp}" + (f" --vpp {vpp}" if vpp else "")
    blocks = f"all {plan.num_new} new blocks" if plan.num_new > 1 else "the new block"
    return (f"warning: {how} with {layout} puts {blocks} on {_stages(holding)}; {_stages(empty)} would train "
            "nothing and the trainer refuses to save such a layout: use --placement interleaved, or train it at "
            "--pp 1 / with --train-all")


def _stages(stages: list[int]) -> str:
    return ("stage " if len(stages) == 1 else "stages ") + _ranges(stages)


def parse_positions(text: str) -> list[int]:
    """'4,9,14' -> [4, 9, 14]; PlanError on anything else."""
    try:
        values = [int(x) for x in text.replace(" ", "").split(",") if x != ""]
    except ValueError:
        raise PlanError(f"--new-block-positions {text!r}: expected comma-separated integers") from None
    if not values:
        raise PlanError("--new-block-positions is empty")
    return values
