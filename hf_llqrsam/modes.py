"""One frozen record per SAM mode: the "preconditioned SAM" template of `docs/algorithm.md` §8.2 as data.

Every place that needs to know something about a mode reads it here: argument validation (which flags belong to a
mode, window-only modes, scope and normaliser restrictions, where LLQR may enter), [`~hf_llqrsam.sam.
compute_perturbation`] (probe, geometry, normaliser, loss-scale convention, state), the step engine
([`~hf_llqrsam.engine.SAMEngine`]: the pass schedule, the descent, which state a checkpoint must carry) and the
documentation's template table ([`mode_table`], generated into `docs/reference/modes.md` and checked by a test).
Adding a mode is one record here, one branch in the math (`sam.py`: its probe, geometry or descent), and its oracle
test; no other file names a mode.

Pure Python: imports nothing but the standard library.
"""

from dataclasses import dataclass
from typing import Literal

__all__ = ["MODES", "SAM_MODE_NAMES", "ModeSpec", "mode_table"]

Probe = Literal["gradient", "ema_difference", "ema", "past_difference", "noise", "auxiliary"]
Geometry = Literal["preconditioner", "identity", "asam", "fisher", "infosam"]
LossScale = Literal["invariant", "true_units"]
Descent = Literal["plain", "gsam", "looksam", "wsam"]
Passes = Literal["two", "one", "cadence"]


@dataclass(frozen=True)
class ModeSpec:
    """What defines one SAM mode in the template ε = ρ·Cv/√(ν(v)² + eps), θ ← OuterOpt(θ, P·g̃).

    Args:
        name (`str`): the `sam_mode` value.
        probe (`str`): how v is built: `gradient` (v = g), `ema_difference` (FSAM: v = g − σḡ), `ema` (VaSSO:
            v = d ← (1 − θ)d + θg), `past_difference` (past-FSAM: v = g̃_{t−1} − σḡ from the state, no pass at θ).
        geometry (`str`): C: `preconditioner` (I, or U when LLQR enters C), `identity`, `asam` (T²), `fisher`
            (diag(1/(g² + η))), `infosam` (diag(1/(b + δ))).
        own_normaliser (`bool`): the mode fixes ν itself, so `sam_norm` must stay `euclidean`.
        descent (`str`): `plain` (P·g̃), `gsam` (g̃ − α g⊥, from the clean gradient kept in the same units as g̃),
            `looksam` (g̃ on full steps, g + α‖g‖ ĝ_v between) or `wsam` (g + γ/(1 − γ)(g̃ − g)).
        state (`tuple[str, ...]`): the [`~hf_llqrsam.sam.SAMState`] buffer kinds the mode keeps and checkpoints.
        window_only (`bool`): needs the whole window's gradient (no `sam_accumulation="micro"`).
        global_only (`bool`): needs the all-reduced gradient (no `sam_scope="local"`).
        loss_scale (`str`): `invariant`: ε is unchanged when g is multiplied by the fp16 loss scale S, so ε is built
            from the scaled gradient; `true_units`: the mode is not scale-invariant (EMAs, g² terms), so it works on
            g/S (`docs/integration.md` §6).
        llqr_geometry (`bool`): LLQR may enter the perturbation as C = U (`llqr_in_perturbation`).
        llqr_descent (`bool`): LLQR may enter the descent as P = U (`llqr_on_update`).
        hyperparameters (`tuple[str, ...]`): the mode's own flags (warned about when set under another mode).
        source (`str`): the paper or code the record follows.
        doc (`tuple[str, str, str, str, str]`): the template table's cells: v, C, ν, P, state.
        passes (`str`, *optional*, defaults to `"two"`): forward/backward passes per step after `sam_start_step`:
            `two` (pass 1 at θ, pass 2 at θ + ε), `one` (one pass at θ + ε, ε from the state) or `cadence` (two
            passes every `looksam_interval`-th step, one pass at θ between). Modes other than `two` set their own
            cadence, so `sam_interval` must stay 1.
        borrows (`tuple[str, ...]`, *optional*, defaults to `()`): hyperparameters of another mode that this mode
            reads too (past-FSAM reads FSAM's `fsam_beta`, `fsam_sigma`, `fsam_ema`); not warned about under it.
        keeps_clean (`bool`, *optional*, defaults to `False`): the descent reads the clean pass-1 gradient g beside
            g̃ (GSAM's g⊥, LookSAM's g_v, WSAM's g̃ − g), so the ascent keeps an fp32 copy of it, aligned by name.
    """

    name: str
    probe: Probe
    geometry: Geometry
    own_normaliser: bool
    descent: Descent
    state: tuple[str, ...]
    window_only: bool
    global_only: bool
    loss_scale: LossScale
    llqr_geometry: bool
    llqr_descent: bool
    hyperparameters: tuple[str, ...]
    source: str
    doc: tuple[str, str, str, str, str]
    passes: Passes = "two"
    borrows: tuple[str, ...] = ()
    keeps_clean: bool = False

    @property
    def acts_on_lora(self) -> bool:
        """The mode perturbs the LoRA layers of a PEFT model, not the trainable tensors: it needs LoRA layers, a
        full-precision base weight and no FSDP2 (`hf_llqrsam/lora_sam.py`)."""
        return self.probe in ("noise", "auxiliary")


MODES: dict[str, ModeSpec] = {
    spec.name: spec
    for spec in (
        ModeSpec(
            name="sam",
            probe="gradient",
            geometry="preconditioner",
            own_normaliser=False,
            descent="plain",
            state=(),
            window_only=False,
            global_only=False,
            loss_scale="invariant",
            llqr_geometry=True,
            llqr_descent=True,
            hyperparameters=(),
            source="Foret et al., ICLR 2021, arXiv 2010.01412",
            doc=("g", "I (U with `--llqr`)", "‖Cv‖ or √(vᵀCv)", "I (U with `--llqr`)", "–"),
        ),
        ModeSpec(
            name="asam",
            probe="gradient",
            geometry="asam",
            own_normaliser=True,
            descent="plain",
            state=(),
            window_only=False,
            global_only=False,
            loss_scale="invariant",
            llqr_geometry=False,
            llqr_descent=True,
            hyperparameters=("asam_eta",),
            source="Kwon et al., ICML 2021 (ASAM), arXiv 2102.11600",
            doc=("g", "T², T = \\|θ\\| + η (T = 1 on biases)", "‖Tg‖", "I (U with `--llqr`)", "–"),
        ),
        ModeSpec(
            name="fsam",
            probe="ema_difference",
            geometry="preconditioner",
            own_normaliser=False,
            descent="plain",
            state=("gbar",),
            window_only=True,
            global_only=False,
            loss_scale="true_units",
            llqr_geometry=True,
            llqr_descent=True,
            hyperparameters=("fsam_beta", "fsam_sigma", "fsam_init", "fsam_ema"),
            source="Li et al., CVPR 2024 (Friendly-SAM)",
            doc=("g − σḡ", "I (U with `--llqr`)", "‖Cv‖ or √(vᵀCv)", "I (U with `--llqr`)", "ḡ"),
        ),
        ModeSpec(
            name="fisher_sam",
            probe="gradient",
            geometry="fisher",
            own_normaliser=True,
            descent="plain",
            state=(),
            window_only=True,
            global_only=False,
            loss_scale="true_units",
            llqr_geometry=False,
            llqr_descent=False,
            hyperparameters=("fisher_sam_form", "fisher_sam_eta"),
            source="Kim et al., ICML 2022 (Fisher SAM)",
            doc=("g", "diag(1/(g² + η))", "√(gᵀCg)", "I", "–"),
        ),
        ModeSpec(
            name="gsam",
            probe="gradient",
            geometry="identity",
            own_normaliser=False,
            descent="gsam",
            state=(),
            window_only=True,
            global_only=True,
            loss_scale="invariant",
            llqr_geometry=False,
            llqr_descent=False,
            hyperparameters=("gsam_alpha",),
            source="Zhuang et al., ICLR 2022 (GSAM), Alg. 1",
            doc=("g", "I", "‖g‖", "g̃ − α g⊥", "–"),
            keeps_clean=True,
        ),
        ModeSpec(
            name="vasso",
            probe="ema",
            geometry="identity",
            own_normaliser=False,
            descent="plain",
            state=("d",),
            window_only=True,
            global_only=False,
            loss_scale="true_units",
            llqr_geometry=False,
            llqr_descent=False,
            hyperparameters=("vasso_theta",),
            source="Li & Giannakis, NeurIPS 2023 (VaSSO)",
            doc=("d ← (1−θ)d + θg", "I", "‖d‖", "I", "d"),
        ),
        ModeSpec(
            name="infosam",
            probe="gradient",
            geometry="infosam",
            own_normaliser=False,
            descent="plain",
            state=("m", "v"),
            window_only=True,
            global_only=False,
            loss_scale="true_units",
            llqr_geometry=False,
            llqr_descent=False,
            hyperparameters=("infosam_alpha", "infosam_damping", "infosam_variance"),
            source="arXiv 2501.06603 (preSAM/infoSAM), built from the authors' prototype (`docs/infosam.md`)",
            doc=("g", "diag(1/(b + δ))", "‖Cg‖ or √(gᵀCg)", "I", "m (and v)"),
        ),
        ModeSpec(
            name="past_fsam",
            probe="past_difference",
            geometry="preconditioner",
            own_normaliser=False,
            descent="plain",
            state=("gbar", "g_last"),
            window_only=True,
            global_only=True,
            loss_scale="true_units",
            llqr_geometry=True,
            llqr_descent=True,
            hyperparameters=("past_fsam_overlap",),
            source="the LLQR reference's past-FSAM (SimonDufLab/LLQR, "
            "`lqr_optimizer/_src/utils/sam_mode_handlers.py:_build_past_fsam_train_step`)",
            doc=("g̃ₜ₋₁ − σḡ", "I (U with `--llqr`)", "‖Cv‖ or √(vᵀCv)", "I (U with `--llqr`)", "ḡ, g̃ₜ₋₁"),
            passes="one",
            borrows=("fsam_beta", "fsam_sigma", "fsam_ema"),
        ),
        ModeSpec(
            name="looksam",
            probe="gradient",
            geometry="identity",
            own_normaliser=False,
            descent="looksam",
            state=("gv",),
            window_only=True,
            global_only=True,
            loss_scale="invariant",
            llqr_geometry=False,
            llqr_descent=False,
            hyperparameters=("looksam_interval", "looksam_alpha"),
            source="Liu et al., CVPR 2022 (LookSAM), Alg. 1",
            doc=("g", "I", "‖g‖", "g̃ every k-th step, g + α‖g‖ g_v/‖g_v‖ between", "g_v"),
            passes="cadence",
            keeps_clean=True,
        ),
        ModeSpec(
            name="wsam",
            probe="gradient",
            geometry="identity",
            own_normaliser=False,
            descent="wsam",
            state=(),
            window_only=True,
            global_only=True,
            loss_scale="invariant",
            llqr_geometry=False,
            llqr_descent=False,
            hyperparameters=("wsam_gamma", "wsam_decouple"),
            source="Yue et al., KDD 2023 (WSAM), Alg. 1",
            doc=("g", "I", "‖g‖", "g + γ/(1−γ)·(g̃ − g)", "–"),
            keeps_clean=True,
        ),
        ModeSpec(
            name="flat_lora",
            probe="noise",
            geometry="identity",
            own_normaliser=True,
            descent="plain",
            state=(),
            window_only=True,
            global_only=True,
            loss_scale="invariant",
            llqr_geometry=False,
            llqr_descent=False,
            hyperparameters=("flat_lora_ramp_steps",),
            source="Li et al., ICML 2025 (Flat-LoRA), arXiv 2409.14396; github.com/nblt/Flat-LoRA "
            "`logTrainer.py:FlatLoraTrainer.training_step`",
            doc=(
                "ξ on W + sBA, row i ~ 𝒩(0, σₜ²‖(W + sBA)ᵢ‖²/n), σₜ = ρ·½(1 − cos πt/T)",
                "–",
                "–",
                "I (the adapter's gradient at W + sBA + ξ)",
                "–",
            ),
            passes="one",
        ),
        ModeSpec(
            name="bi_lora",
            probe="auxiliary",
            geometry="identity",
            own_normaliser=True,
            descent="plain",
            state=("aux",),
            window_only=True,
            global_only=True,
            loss_scale="invariant",
            llqr_geometry=False,
            llqr_descent=False,
            hyperparameters=("bi_lora_lr",),
            source="Liu et al., ICLR 2026 (Bi-LoRA), arXiv 2508.19564",
            doc=(
                "g₂, the gradient of the auxiliary adapter θ₂ = (A₂, B₂), ε = sB₂A₂",
                "I",
                "θ₂ ← Π_ρ(θ₂ + η₂ g₂/‖g₂‖), ‖θ₂‖ ≤ ρ",
                "I (the adapter's gradient at W + sBA + sB₂A₂)",
                "θ₂",
            ),
            passes="one",
        ),
    )
}

SAM_MODE_NAMES: tuple[str, ...] = ("none", *MODES)


def mode_table() -> str:
    """The SAM-family template table (one row per [`ModeSpec`]), as markdown (`docs/reference/modes.md`).

    Columns: probe v, geometry C, normaliser ν, descent P, state, passes per step, window-only, LLQR in C / P, fp16
    loss scale.
    """
    header = (
        "| mode | probe v | geometry C | normaliser ν | descent P | state | passes | window only | LLQR in C / P "
        "| loss scale |\n"
        "|---|---|---|---|---|---|---|---|---|---|"
    )
    passes = {"two": "2", "one": "1", "cadence": "2 every k-th step, else 1"}
    rows = []
    for spec in MODES.values():
        v, c, nu, p, state = spec.doc
        llqr = f"{'yes' if spec.llqr_geometry else 'no'} / {'yes' if spec.llqr_descent else 'no'}"
        scale = "scaled g" if spec.loss_scale == "invariant" else "g / S"
        window = "yes" if spec.window_only else "no"
        rows.append(
            f"| `{spec.name}` | {v} | {c} | {nu} | {p} | {state} | {passes[spec.passes]} | {window} | {llqr} "
            f"| {scale} |"
        )
    return "\n".join([header, *rows])
