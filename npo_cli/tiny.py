"""The embedded default model: a 1M-parameter Qwen2 and a character tokenizer, both defined here.

Nothing is downloaded: the config is a JSON file in the package and the tokenizer is built
in code, then saved with every checkpoint as ordinary tokenizer files, so an exported folder
loads with plain `AutoTokenizer` / `AutoModelForCausalLM`.
"""

from __future__ import annotations

import json
from importlib import resources

# transformers is imported where used: commands that only read the store (npo ls) start without it

PAD, EOS, UNK = "<pad>", "<eos>", "<unk>"
# Printable ASCII and newline: enough for arithmetic and short math text.
CHARS = [chr(c) for c in range(32, 127)] + ["\n"]


def char_tokenizer():
    """A PreTrainedTokenizerFast over CHARS, with pad, EOS and unknown tokens."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    vocab = {PAD: 0, EOS: 1, UNK: 2}
    for ch in CHARS:
        vocab[ch] = len(vocab)
    # BPE with no merges splits text into single characters; Fuse joins them back without spaces.
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=UNK))
    core.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token=PAD, eos_token=EOS, unk_token=UNK, padding_side="left"
    )


def tiny_config():
    """The tiny Qwen2 config (npo_cli/assets/tiny_config.json)."""
    from transformers import AutoConfig

    data = json.loads(resources.files("npo_cli").joinpath("assets/tiny_config.json").read_text())
    return AutoConfig.for_model(**data)
