#!/usr/bin/env python
# Copyright 2026 The hf_llqrsam authors. Licensed under the Apache License, Version 2.0.
"""How large is a SAM radius ρ in the LoRA subspace? A probe at the start of fine-tuning, to choose `--sam_rho`.

ε = ρ·g/‖g‖ lives in the trainable parameters only, which with LoRA are the adapters (and at the start, where every
B is zero, g and so ε are in the B matrices only). So a ρ taken from full-model fine-tuning says little here. For
each ρ of `--rhos` and each of `--probe_batches` training batches of the recipe (same model, data, flags), the probe
reports, averaged over the batches:

* `sharpness`: L(w + ε) − L(w), and `first_order`: ρ‖g‖, its linear part; their gap is the curvature SAM acts on;
* `cos`: the cosine between the SAM gradient g(w + ε) and g: at 1, SAM is plain gradient descent with extra cost;
* `rel_eps`: ρ / ‖θ_trainable‖.

From the repository root (the recipe's flags apply; the defaults probe the shipped SmolLM2 with LoRA):

    python recipes/causal_lm/probe_rho.py --output_dir runs/probe_rho --rhos 0.01,0.05,0.1,0.2,0.5,1

It prints one line per ρ and writes `<output_dir>/probe_rho.json`. Pure torch on the recipe's model; no training.
"""

import json
import math
import os
import sys
from dataclasses import dataclass, field

import torch
from transformers import HfArgumentParser, set_seed

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import run_causal_lm  # noqa: E402


@dataclass
class ProbeArguments:
    rhos: str = field(default="0.01,0.05,0.1,0.2,0.5,1", metadata={"help": "Comma-separated radii to probe."})
    probe_batches: int = field(default=4, metadata={"help": "Training batches to average over."})


def loss_and_grad(model: torch.nn.Module, batch: dict, params: list[torch.Tensor]) -> tuple[float, list[torch.Tensor]]:
    loss = model(**batch).loss
    grads = torch.autograd.grad(loss, params)
    return float(loss.detach()), list(grads)


def main(argv: list[str] | None = None) -> list[dict[str, float]]:
    argv = list(sys.argv[1:] if argv is None else argv)
    probe_args, rest = HfArgumentParser(ProbeArguments).parse_known_args(argv)
    model_args, data_args, training_args = run_causal_lm.parse_args(rest)
    set_seed(training_args.seed)
    raw = run_causal_lm.load_raw_datasets(data_args, model_args)
    model, tokenizer = run_causal_lm.build_model(model_args)
    training_args.do_eval = training_args.do_predict = False
    train, _, _ = run_causal_lm.tokenize_splits(raw, tokenizer, data_args, training_args)
    collate = run_causal_lm.CausalLMCollator(tokenizer.pad_token_id)
    size = training_args.per_device_train_batch_size
    rows = train.shuffle(seed=training_args.seed).select_columns(["input_ids", "labels"])
    batches = [collate([rows[i] for i in range(b * size, (b + 1) * size)]) for b in range(probe_args.probe_batches)]
    model.eval()  # no dropout: the probe compares two deterministic passes
    params = [p for p in model.parameters() if p.requires_grad]
    theta_norm = math.sqrt(sum(float(p.detach().pow(2).sum()) for p in params))
    rhos = [float(rho) for rho in probe_args.rhos.split(",")]
    sums = {rho: {"sharpness": 0.0, "first_order": 0.0, "cos": 0.0, "loss": 0.0} for rho in rhos}
    for batch in batches:
        loss, grads = loss_and_grad(model, batch, params)
        g_norm = math.sqrt(sum(float(g.pow(2).sum()) for g in grads))
        for rho in rhos:
            with torch.no_grad():
                for p, g in zip(params, grads, strict=True):
                    p.add_(g, alpha=rho / g_norm)
            perturbed, sam_grads = loss_and_grad(model, batch, params)
            with torch.no_grad():
                for p, g in zip(params, grads, strict=True):
                    p.sub_(g, alpha=rho / g_norm)
            dot = sum(float((g * h).sum()) for g, h in zip(grads, sam_grads, strict=True))
            h_norm = math.sqrt(sum(float(h.pow(2).sum()) for h in sam_grads))
            for key, value in [
                ("sharpness", perturbed - loss),
                ("first_order", rho * g_norm),
                ("cos", dot / (g_norm * h_norm)),
                ("loss", loss),
            ]:
                sums[rho][key] += value / len(batches)
    results = [{"rho": rho, **values, "rel_eps": rho / theta_norm} for rho, values in sums.items()]
    count = sum(p.numel() for p in params)
    print(f"trainable parameters {count}, norm {theta_norm:.4g}, loss {results[0]['loss']:.4g}")
    for row in results:
        print(
            f"rho {row['rho']:<6g} sharpness {row['sharpness']:.4f}  first-order {row['first_order']:.4f}  "
            f"cos(g, g_sam) {row['cos']:.4f}  rho/|theta| {row['rel_eps']:.2e}"
        )
    os.makedirs(training_args.output_dir, exist_ok=True)
    with open(os.path.join(training_args.output_dir, "probe_rho.json"), "w", encoding="utf-8") as f:
        json.dump(results, f, indent=2)
    return results


if __name__ == "__main__":
    main()
