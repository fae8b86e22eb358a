"""A tokenizer.model rebuilt at the same path is read anew: tiktoken would otherwise serve its cached copy."""

import base64

from torchtune.models.llama3 import llama3_tokenizer

import lora_tools  # noqa: F401  (sets the tiktoken cache folder to none)
from lora_tools.demo.assets import build_bpe_ranks


def _write(path, text):
    ranks = build_bpe_ranks([text])
    path.write_text("".join(f"{base64.b64encode(token).decode()} {rank}\n" for token, rank in ranks.items()))
    return ranks


def test_a_replaced_tokenizer_file_is_read_again(tmp_path):
    path = tmp_path / "tokenizer.model"
    for words in (["lemon", " yellow"], ["ocean", " blue", " sky"]):  # the second file has other ids
        ranks = _write(path, "".join(words))
        ids = llama3_tokenizer(str(path)).encode("".join(words), add_bos=False, add_eos=False)
        assert ids == [ranks[w.encode()] for w in words]
