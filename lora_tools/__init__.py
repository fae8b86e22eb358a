"""Pieces shared by this project's recipes and scripts: settings from .env, one-line errors, config checks,
data preparation (per-sample label shift before packing) and the tiny offline assets."""

import os as _os
from pathlib import Path as _Path

# The checkout that holds this package: the local evaluation tasks (evals/) and the git commit are read from here.
REPO = _Path(__file__).resolve().parent.parent

# tiktoken (under torchtune's Llama 3 tokenizer) keeps a copy of every tokenizer.model it reads, keyed by the
# file's path, in a temporary folder, and serves that copy from then on: a tokenizer file rebuilt or replaced at
# the same path would be read as the old one. An empty cache folder makes it read the file itself each time.
_os.environ.setdefault("TIKTOKEN_CACHE_DIR", "")
