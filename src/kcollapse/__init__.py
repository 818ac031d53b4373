"""kcollapse: run, measure and explain knowledge collapse.

A language model is fine-tuned, generation after generation, on a mix of real text and text written by its
previous generation (Keisha et al. 2025, arXiv 2509.04796). kcollapse runs that loop on any Hugging Face causal LM
(or on a tiny offline *model organism*), measures model-centric and task-centric metrics every generation, and
says when knowledge collapse (stage B) and instruction-following collapse (stage C) begin.

The package follows the loop: corpus -> synthesize -> train -> evaluate -> stages -> report.
"""

__version__ = "0.1.0"
