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

# Transparent huge pages for torch's CPU tensors of 2 MB or more. A real model's vocabulary-wide buffers (logits
# chunks, the cast output projection, its gradient: ~3.4 GB a 512-token micro-batch at Gemma 3's 262k x 640) are
# fresh mmaps each time, and first touching them cost ~850k page faults a micro-batch; with huge pages ~10-50k,
# and a bf16 2,048-token training step of Gemma 3 270M took 19.6 s instead of 22.9 s (2 threads, measured).
# Read by torch at its first allocation, so only if torch is not imported yet; the user's setting wins.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
