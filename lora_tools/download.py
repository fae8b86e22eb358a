"""Download model weights from the Hugging Face Hub with the token from .env, never from the command line.

    python -m lora_tools.download meta-llama/Llama-3.2-3B-Instruct --output-dir ckpts/Llama-3.2-3B-Instruct

Does what `tune download` does (same default ignore pattern for the unused original .pth file) but reads
HF_TOKEN from the environment or ./.env, reports each failure in one line with the fix, and records the
repository id next to the files so the adapter config can name its base model.
"""

import argparse
import errno
import json
import os
import sys
from pathlib import Path

from lora_tools.config.env import load_env
from lora_tools.errors import UserError, fail

# torchtune's checkpointer reads this file to fill adapter_config.json's base_model_name_or_path.
REPO_ID_FILE = "original_repo_id.json"


def download(repo_id: str, output_dir: Path, ignore_patterns: list[str]) -> Path:
    from huggingface_hub import snapshot_download

    token = os.environ.get("HF_TOKEN", "").strip() or None
    path = snapshot_download(repo_id, local_dir=output_dir, ignore_patterns=ignore_patterns, token=token)
    (Path(path) / REPO_ID_FILE).write_text(json.dumps({"repo_id": repo_id}) + "\n")
    return Path(path)


def explain(e: BaseException, repo_id: str, has_token: bool) -> str:
    """One line for each way a download fails, with what to do about it."""
    from huggingface_hub.errors import GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError

    page = f"https://huggingface.co/{repo_id}"
    if isinstance(e, GatedRepoError):
        if not has_token:
            return f"{repo_id} is gated and HF_TOKEN is not set; put a read token in .env; request access on {page}"
        return f"your HF_TOKEN has no access to the gated {repo_id}; request access on {page} and wait for approval"
    if isinstance(e, RepositoryNotFoundError):
        if not has_token:
            return f"repository {repo_id} not found (or private and HF_TOKEN is unset); check the name, or set HF_TOKEN"
        return (
            f"repository {repo_id} not found, or your HF_TOKEN cannot see it; check the name on https://huggingface.co"
        )
    if isinstance(e, OSError) and e.errno == errno.ENOSPC:
        return "not enough disk space for the download; free space or pass --output-dir on a larger disk"
    if isinstance(e, LocalEntryNotFoundError) or "connect" in type(e).__name__.lower() or "connect" in str(e).lower():
        return "cannot reach the Hugging Face Hub (no network?); connect and retry, or copy the files into --output-dir"
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    if "401" in text and has_token:
        return "HF_TOKEN was rejected by the Hub; create a new read token at https://huggingface.co/settings/tokens"
    return f"download of {repo_id} failed: {text}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("repo_id", help="e.g. meta-llama/Llama-3.2-3B-Instruct")
    parser.add_argument("--output-dir", type=Path, required=True, help="where to put the files")
    parser.add_argument(
        "--ignore-patterns",
        nargs="*",
        default=["original/consolidated.00.pth"],
        help="files to skip (default: %(default)s)",
    )
    args = parser.parse_args(argv)
    try:
        load_env()
    except UserError as e:
        return fail(str(e))
    has_token = bool(os.environ.get("HF_TOKEN", "").strip())
    try:
        path = download(args.repo_id, args.output_dir, args.ignore_patterns)
    except KeyboardInterrupt:
        return fail("download interrupted; run the same command again to resume")
    except Exception as e:  # every failure becomes one line; the Hub client raises many types
        print(f"error: {explain(e, args.repo_id, has_token)}", file=sys.stderr)
        return 1
    print(f"downloaded {args.repo_id} to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
