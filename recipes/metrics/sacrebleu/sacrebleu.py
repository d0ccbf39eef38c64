# Adapted from huggingface/evaluate metrics/sacrebleu/sacrebleu.py (Apache-2.0), shipped so that the recipes can
# load it offline with `evaluate.load("<path to this folder>")`. Single reference per prediction, sacreBLEU defaults
# (13a tokenisation, exp smoothing); the recipes' fallback calls `sacrebleu.corpus_bleu` the same way.
"""SacreBLEU metric (offline copy for the hf_llqrsam recipes)."""

import datasets
import evaluate
import sacrebleu as scb

_CITATION = """\
@inproceedings{post-2018-call,
    title = "A Call for Clarity in Reporting {BLEU} Scores",
    author = "Post, Matt",
    booktitle = "Proceedings of the Third Conference on Machine Translation: Research Papers",
    year = "2018",
    pages = "186--191",
}
"""

_DESCRIPTION = "Corpus-level BLEU computed by sacreBLEU (https://github.com/mjpost/sacreBLEU)."

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `str`): detokenised hypotheses.
    references (`list` of `str` or `list` of `list` of `str`): one reference per prediction (a list of one
        string is accepted too, as in the hub module).

Returns:
    score (`float`): BLEU in [0, 100]; plus `counts`, `totals`, `precisions`, `bp`, `sys_len`, `ref_len`.

Examples:
    >>> bleu = evaluate.load("recipes/metrics/sacrebleu")
    >>> result = bleu.compute(predictions=["hello there general kenobi"], references=[["hello there general kenobi"]])
    >>> round(result["score"], 1)
    100.0
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Sacrebleu(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            homepage="https://github.com/mjpost/sacreBLEU",
            inputs_description=_KWARGS_DESCRIPTION,
            features=[
                datasets.Features(
                    {
                        "predictions": datasets.Value("string", id="sequence"),
                        "references": datasets.Sequence(datasets.Value("string", id="sequence"), id="references"),
                    }
                ),
                datasets.Features(
                    {
                        "predictions": datasets.Value("string", id="sequence"),
                        "references": datasets.Value("string", id="sequence"),
                    }
                ),
            ],
        )

    def _compute(self, predictions, references):
        references = [refs if isinstance(refs, str) else refs[0] for refs in references]
        output = scb.corpus_bleu(predictions, [references])
        return {
            "score": output.score,
            "counts": output.counts,
            "totals": output.totals,
            "precisions": output.precisions,
            "bp": output.bp,
            "sys_len": output.sys_len,
            "ref_len": output.ref_len,
        }
