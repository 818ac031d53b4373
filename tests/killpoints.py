"""`python tests/killpoints.py run CFG --out OUT`: the kcollapse command line with pause points for the kill tests.

Production code has no test hooks: this launcher wraps library functions before the command runs. With
KCOLLAPSE_TEST_PAUSE="<point>@<n>", the n-th time the process passes <point> it writes "<point>@<n> <pid>" to the
file KCOLLAPSE_TEST_PAUSE_FILE and sleeps until the test SIGKILLs it (or exits with 3 after 120 s). Points:
  greedy / sample   after a batch of greedy / sampled decoding (mid-evaluation / mid-synthesis)
  train_step        after a training step (mid-fine-tuning)
  save_model        after the weights of a checkpoint are written, before its tokenizer (mid-checkpoint)
Installed at import, so spawned arm workers (which import this file as their __mp_main__) get them too.
"""

from __future__ import annotations

import functools
import os
import signal
import time
from pathlib import Path

HITS: dict[str, int] = {}


def pause_point(point: str) -> None:
    want = os.environ.get("KCOLLAPSE_TEST_PAUSE", "")
    name, _, n = want.partition("@")
    if name != point:
        return
    HITS[point] = HITS.get(point, 0) + 1
    if HITS[point] != int(n or 1):
        return
    target = Path(os.environ["KCOLLAPSE_TEST_PAUSE_FILE"])
    partial = target.with_name(f"{target.name}.{os.getpid()}.tmp")
    partial.write_text(f"{want} {os.getpid()}")
    os.replace(partial, target)  # whole or absent: the test reads it the moment it exists (it once read it empty)
    deadline = time.time() + 120
    while time.time() < deadline:
        time.sleep(0.05)
    os._exit(3)


def after(owner, name: str, point) -> None:
    """Wrap owner.name so that `pause_point(point(*args, **kw))` runs after each call returns."""
    real = getattr(owner, name)

    @functools.wraps(real)
    def wrapped(*args, **kw):
        out = real(*args, **kw)
        pause_point(point(*args, **kw))
        return out

    setattr(owner, name, wrapped)


def install() -> None:
    if not os.environ.get("KCOLLAPSE_TEST_PAUSE"):
        return
    import transformers

    from kcollapse import lm

    after(lm.LM, "decode_batch", lambda self, *a, do_sample=False, **kw: "sample" if do_sample else "greedy")
    after(transformers.Trainer, "training_step", lambda *a, **kw: "train_step")
    after(transformers.PreTrainedModel, "save_pretrained", lambda *a, **kw: "save_model")


install()

if __name__ == "__main__":
    from kcollapse.cli import main

    # the kill tests press Ctrl-C as a terminal would; a test run started in the background of a non-interactive
    # shell (`.ci/run &`) hands its children SIGINT ignored, and Python then keeps it ignored
    signal.signal(signal.SIGINT, signal.default_int_handler)

    main()
