"""kcollapse: run, measure and explain knowledge collapse.

A language model is fine-tuned, generation after generation, on a mix of real text and text written by its
previous generation (Keisha et al. 2025, arXiv 2509.04796). kcollapse runs that loop on any Hugging Face causal LM
(or on a tiny offline *model organism*), measures model-centric and task-centric metrics every generation, and
says when knowledge collapse (stage B) and instruction-following collapse (stage C) begin.

The package follows the loop: corpus -> synthesize -> train -> evaluate -> stages -> report.
"""

import os

__version__ = "0.1.0"

# How long an idle OpenMP thread spins before it sleeps, chosen by measurement (a 1M GPT-2 training step at 2
# threads on 2 cores, `kcollapse bench` machine): sleeping at once (OMP_WAIT_POLICY=PASSIVE) 74 ms alone and 116 ms
# beside two busy processes; libgomp's default spin 65 ms alone but 274 ms beside them; 1000 spins 63 ms alone and
# 131 ms beside them. Takes effect only if torch is not imported yet; the user's OpenMP settings win.
if "OMP_WAIT_POLICY" not in os.environ:
    os.environ.setdefault("GOMP_SPINCOUNT", "1000")
