"""lm-evaluation-harness's own command line with the ``megatron-spd`` model backend registered.

    python tools/lm_eval_spd.py --model megatron-spd --model_args ckpt=CK,plan=PLAN.json \\
        --tasks spd_paper --include_path megatron_spd/integrations/lm_eval_tasks [lm_eval options]
    torchrun --nproc-per-node 3 tools/lm_eval_spd.py --model megatron-spd --model_args tp=3,...

Every argument is lm-eval's (``lm_eval --help``). lm-eval 0.4.13 has no plugin mechanism for
models, so this command imports ``megatron_spd.integrations.lm_eval`` (which registers the
backend) and hands over to lm-eval's entry point. Needs the extra: ``pip install -e '.[lm-eval]'``.
"""
from __future__ import annotations

import sys

from . import common as cli


@cli.entry
def main(argv=None) -> None:
    from ..integrations import lm_eval  # noqa: F401 - registers the backend
    from lm_eval.__main__ import cli_evaluate

    if argv is not None:
        sys.argv[1:] = list(argv)
    cli_evaluate()


if __name__ == "__main__":
    main()
