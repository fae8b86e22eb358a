"""The share of positions that carry a label in the bench's packed batches, for the data of a past commit.

The GPU runs in bench/results measured peak memory with the output layer applied to labelled positions only,
so predicting them needs that share. The data came from that commit's lora_tools.tiny_assets; this script
rebuilds it in a temporary git worktree, packs it as bench/run.py does (rows of --seq), groups consecutive rows
in batches of --batch and writes the largest and the mean share over those to bench/results/plan/. (The runs
shuffled the rows and shifted labels per sample; on this data every packed row has about the same share.)

    python -m bench.trained_share --commit 4b3e03e --train-on-input false
"""

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--commit", required=True)
    parser.add_argument("--train-on-input", choices=["true", "false"], required=True)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=4)
    args = parser.parse_args()
    from torchtune.datasets import PackedDataset, alpaca_cleaned_dataset
    from torchtune.models.llama3 import llama3_tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        tree = Path(tmp) / "tree"
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(tree), args.commit], check=True)
        try:
            assets = tree / "assets" / "tiny"
            subprocess.run([sys.executable, "-m", "lora_tools.tiny_assets", "--out", str(assets)], cwd=tree, check=True)
            tokenizer = llama3_tokenizer(
                str(assets / "original" / "tokenizer.model"),
                special_tokens_path=str(assets / "special_tokens.json"),
                max_seq_len=args.seq,
            )
            ds = alpaca_cleaned_dataset(
                tokenizer,
                source="json",
                data_files=str(assets / "data" / "train.json"),
                train_on_input=args.train_on_input == "true",
            )
            labelled = [int((row["labels"] != -100).sum()) for row in PackedDataset(ds, max_seq_len=args.seq)]
        finally:
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(tree)], check=True)
    size = args.batch * args.seq
    shares = [sum(labelled[i : i + args.batch]) / size for i in range(0, len(labelled) - args.batch + 1, args.batch)]
    result = {
        "command": " ".join(["python -m bench.trained_share", *sys.argv[1:]]),
        "commit": args.commit,
        "train_on_input": args.train_on_input == "true",
        "seq": args.seq,
        "batch": args.batch,
        "packed_rows": len(labelled),
        "largest_share": max(shares),
        "mean_share": sum(shares) / len(shares),
    }
    out = REPO / "bench" / "results" / "plan" / f"trained-share-{args.commit}-train-on-input-{args.train_on_input}.json"
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
