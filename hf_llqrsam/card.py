"""The model-card section that names the training method and its hf_llqrsam hyperparameters."""

from typing import Any

from .modes import MODES


def method_card_section(args: Any) -> str:
    """Markdown naming the method (e.g. LLQR+SAM over AdamW) and every `sam_*`/per-mode/`llqr_*` value it used.

    The stock card lists no hf_llqrsam field, so [`LLQRSAMTrainer.create_model_card`] appends this section; a card
    pushed with `push_to_hub` therefore carries it too.
    """
    optim = str(getattr(args.optim, "value", args.optim))
    if args.sam_mode == "none":
        method = f"{optim} with LLQR preconditioning" if args.llqr else f"{optim} (no SAM)"
    else:
        method = f"{'LLQR+' if args.llqr else ''}{args.sam_mode.upper()} (rho={args.sam_rho}) over {optim}"
    prefixes = ["llqr"] if args.llqr else []
    borrowed: tuple[str, ...] = ()
    if args.sam_mode != "none":
        prefixes += ["sam_", f"{args.sam_mode}_"]
        borrowed = MODES[args.sam_mode].borrows  # e.g. past-FSAM reads fsam_beta, fsam_sigma, fsam_ema
    values = {
        k: v for k, v in args.to_dict().items() if k == "sam_mode" or k.startswith(tuple(prefixes)) or k in borrowed
    }
    lines = "\n".join(f"- {k}: {v}" for k, v in values.items())
    return (
        f"\n## Training method (hf_llqrsam)\n\nTrained with `hf_llqrsam`: **{method}**.\n\n"
        f"The following hf_llqrsam hyperparameters were used:\n{lines}\n"
    )
