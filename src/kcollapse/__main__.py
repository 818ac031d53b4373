"""`python -m kcollapse` is the `kcollapse` command (also what `accelerate launch -m kcollapse run` starts)."""

from kcollapse.cli import app

app()
