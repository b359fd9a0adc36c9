"""Writes tests/data/saved_2026_12_03/: tiny MIDUS models saved by midus as it was just before the
memory options became ``midus_ops.MemoryOptions`` (issue 14), with the logits they gave then:
query_norm="rms" with a learned temperature (HML), and PKM with a learned temperature.

tests/test_compat.py loads them with the current code. Like make_saved_models.py it was run once,
at commit fc12d47 (a worktree of that commit on PYTHONPATH, its extension built from the same
sources), with transformers 5.24.0:
    PYTHONPATH=<worktree at fc12d47> python tests/data/make_saved_models_2026_12_03.py tests/data/saved_2026_12_03
Re-running it with later code would defeat its purpose.
"""

import os
import sys

from make_saved_models import main  # the same tiny base model and procedure as saved_v0_1_0

VARIANTS = {"hml-rms-learn-tau": {"query_norm": "rms", "learn_tau": True, "tau": 0.7},
            "pkm-learn-tau": {"memory": "pkm", "pkm_heads": 2, "pkm_d_k": 8, "learn_tau": True}}

if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else
                  os.path.join(os.path.dirname(os.path.abspath(__file__)), "saved_2026_12_03"), VARIANTS))
