"""Look at the training data as the model will see it, before training.

    python -m lora_tools.data --config configs/tiny_chat.yaml              # 3 samples and the summary
    python -m lora_tools.data --config CFG --show 10 tokenizer.max_seq_len=1024

Prints the first samples as the token ids decode, the trained tokens marked, then for the whole dataset (and
val_dataset): samples, tokens per sample, how many are truncated at tokenizer.max_seq_len and how many tokens
that cuts, samples with nothing to train on, and how full packed rows are. Preference pairs
(lora_tools.data.preference) show their prompt once, then the chosen and the rejected response, and their own
summary. Reads no model weights. The recipes log the same summary when they start.
"""

import argparse
import itertools
import sys

from torchtune import config
from torchtune.data import CROSS_ENTROPY_IGNORE_IDX

from lora_tools.config import loader, preflight
from lora_tools.data import mixing
from lora_tools.data.batching import BuiltDataset, build_dataset
from lora_tools.data.preference import PairSummary, PreferencePairs
from lora_tools.errors import UserError, fail

TRAINED_START, TRAINED_END = "\x1b[32m", "\x1b[0m"  # green on a terminal
PLAIN_START, PLAIN_END = "«", "»"  # in a file or pipe


def marked_text(tokenizer, tokens: list[int], trained: list[bool], start: str, end: str) -> str:
    """The sample's text with each run of trained tokens between ``start`` and ``end``."""
    out, run, run_trained = [], [], None
    for token, is_trained in [*zip(tokens, trained, strict=True), (None, None)]:
        if is_trained != run_trained and run:
            text = tokenizer.decode(run, truncate_at_eos=False, skip_special_tokens=False)
            out.append(f"{start}{text}{end}" if run_trained else text)
            run = []
        run.append(token)
        run_trained = is_trained
    return "".join(out)


def show_samples(tokenizer, built: BuiltDataset, count: int, out=None) -> None:
    out = out or sys.stdout
    start, end = (TRAINED_START, TRAINED_END) if out.isatty() else (PLAIN_START, PLAIN_END)
    out.write(f"trained tokens are marked {start}like this{end}\n")
    for i in range(min(count, len(built.samples))):
        sample = built.samples[i]
        tokens = list(sample["tokens"])
        # labels are shifted: token j is trained when the label at j - 1 (its prediction) is kept
        trained = [False] + [label != CROSS_ENTROPY_IGNORE_IDX for label in sample["labels"][:-1]]
        out.write(f"--- sample {i} ({len(tokens)} tokens, {sum(trained)} trained)\n")
        out.write(marked_text(tokenizer, tokens, trained, start, end) + "\n")


def show_pairs(tokenizer, pairs: list[PreferencePairs], count: int, out=None) -> None:
    """The first ``count`` pairs: the prompt once, then each response marked as trained."""
    out = out or sys.stdout
    start, end = (TRAINED_START, TRAINED_END) if out.isatty() else (PLAIN_START, PLAIN_END)
    out.write(f"trained tokens are marked {start}like this{end}\n")
    items = (part[i] for part in pairs for i in range(len(part)))
    for n, item in enumerate(itertools.islice(items, count)):
        labels = item["chosen_labels"]  # not shifted: the prompt's labels are ignored, the response's kept
        prompt = next(i for i, label in enumerate(labels) if label != CROSS_ENTROPY_IGNORE_IDX)
        sizes = ", ".join(f"{name} {len(item[f'{name}_tokens']) - prompt}" for name in ("chosen", "rejected"))
        out.write(f"--- pair {n} (prompt {prompt} tokens; responses: {sizes})\n")
        text = tokenizer.decode(item["chosen_tokens"][:prompt], truncate_at_eos=False, skip_special_tokens=False)
        out.write(text if text.endswith("\n") else text + "\n")
        for name in ("chosen", "rejected"):
            tokens = item[f"{name}_tokens"][prompt:]
            trained = [label != CROSS_ENTROPY_IGNORE_IDX for label in item[f"{name}_labels"][prompt:]]
            out.write(f"{name}: {marked_text(tokenizer, tokens, trained, start, end)}\n")


def pairs_of(built: BuiltDataset, name: str) -> list[PreferencePairs] | None:
    """The preference datasets ``built`` holds, or None when it holds none."""
    pairs = [part for part in built.parts if isinstance(part, PreferencePairs)]
    if pairs and len(pairs) != len(built.parts):
        raise UserError(f"{name} mixes preference pairs with other datasets; use preference_dataset for each")
    return pairs or None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("--show", type=int, default=3, help="samples to print (default: %(default)s)")
    args, overrides = parser.parse_known_args(argv)
    if args.show < 0:
        return fail(f"--show {args.show}: give 0 or more samples to print")
    try:
        cfg = loader.load(["--config", args.config, *overrides]).cfg  # the same typo and value checks as training
        preflight.check_datasets(cfg)
        tokenizer = config.instantiate(cfg.tokenizer)
        sections = [("dataset", cfg.dataset)] + ([("val_dataset", cfg.val_dataset)] if cfg.get("val_dataset") else [])
        seed = cfg.get("seed", None)
        seed = mixing.DEFAULT_SEED if seed is None else seed  # training draws a seed of its own for seed: null
        built = {name: build_dataset(node, tokenizer, CROSS_ENTROPY_IGNORE_IDX, name, seed) for name, node in sections}
        pairs = {name: pairs_of(b, name) for name, b in built.items()}
    except UserError as e:
        return fail(str(e))
    if pairs["dataset"]:
        show_pairs(tokenizer, pairs["dataset"], args.show)
    else:
        show_samples(tokenizer, built["dataset"], args.show)
    for name, b in built.items():
        summary = PairSummary.of(pairs[name]) if pairs[name] else b.summary
        print("\n".join(summary.lines(name)))
        warnings = summary.warnings(name) if pairs[name] else [summary.truncation_warning(name)]
        for warning in filter(None, warnings):
            print(f"warning: {warning}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
