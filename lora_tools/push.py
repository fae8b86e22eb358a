"""Upload a checkpoint to the Hugging Face Hub: its adapter and model card, and on request its merged model and
GGUF files, in one commit, with the token from .env (a write token).

    python -m lora_tools.push --config configs/llama3_2_3b_chat.yaml --repo-id you/llama-3.2-3b-chat
    python -m lora_tools.push --config ... --checkpoint outputs/.../step_0000500 --repo-id you/name --private
    python -m lora_tools.push --config ... --repo-id you/name --merged --gguf     # + merged/ and gguf/

The repository's top level is the adapter folder (adapter_config.json, adapter_model.safetensors, and README.md,
the model card), so ``PeftModel.from_pretrained(base, "you/name")`` loads it; ``merged/`` holds the merged model
(``from_pretrained("you/name", subfolder="merged")``) and ``gguf/`` and ``gguf-adapter/`` the GGUF exports.
A repository that already holds files is left alone unless --overwrite is given: then files of the same name are
replaced and the others kept. Each failure is one line and exit status 2.
"""

import argparse
import os
import sys
from pathlib import Path

from lora_tools import checkpoints
from lora_tools.config.env import load_env
from lora_tools.errors import UserError, fail

TOKENS_PAGE = "https://huggingface.co/settings/tokens"
GGUF_FOLDERS = ("gguf", "gguf-adapter")


def files_to_push(checkpoint: Path, merged: bool, gguf: bool) -> dict[str, Path]:
    """Path in the repository -> local file, for the adapter (and its card), merged/ and the GGUF folders."""
    adapter = checkpoint / checkpoints.ADAPTER
    files = {p.name: p for p in sorted(adapter.iterdir()) if p.is_file()}
    if merged:
        files |= {f"merged/{p.name}": p for p in sorted((checkpoint / checkpoints.MERGED).iterdir()) if p.is_file()}
    if gguf:
        folders = [checkpoint / name for name in GGUF_FOLDERS if (checkpoint / name).is_dir()]
        if not folders:
            raise UserError(
                f"{checkpoint} has no GGUF files; write them first with: python -m lora_tools.export --config "
                f"<your config> --checkpoint {checkpoint} --gguf (or --gguf-adapter)"
            )
        for folder in folders:
            files |= {f"{folder.name}/{p.name}": p for p in sorted(folder.iterdir()) if p.suffix != ".tmp"}
    return files


def checked_token() -> str:
    """HF_TOKEN from the environment or .env, once the Hub says it may write."""
    token = os.environ.get("HF_TOKEN", "").strip()
    if not token:
        raise UserError(f"HF_TOKEN is not set; put a write token from {TOKENS_PAGE} in .env as HF_TOKEN=...")
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        raise UserError("HF_HUB_OFFLINE is set, so nothing can be uploaded; unset it (or set it to 0) to push")
    return token


def push(cfg, checkpoint: Path | None, repo_id: str, private: bool, merged: bool, gguf: bool, overwrite: bool) -> str:
    """Upload and return the repository's URL."""
    from huggingface_hub import CommitOperationAdd, HfApi
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
    except ValueError as e:
        raise UserError(f"--repo-id {repo_id!r} is not a Hub repository id ({e}); use your-name/model-name")
    checkpoint = checkpoints.resolve(cfg.output_dir, checkpoint, merged=merged)
    if not (checkpoint / checkpoints.ADAPTER / "README.md").is_file():  # a step checkpoint: the card of its settings
        from lora_tools.export import model_card

        model_card.run_card(cfg, checkpoint, None, None, None)
    files = files_to_push(checkpoint, merged, gguf)
    api = HfApi(endpoint=os.environ.get("HF_ENDPOINT") or None, token=checked_token())  # HF_ENDPOINT: a mirror
    role = api.whoami().get("auth", {}).get("accessToken", {}).get("role")
    if role == "read":
        raise UserError(f"HF_TOKEN is a read token; pushing needs a write token: create one at {TOKENS_PAGE}")
    url = api.create_repo(repo_id, private=private, exist_ok=True)
    held = [f for f in api.list_repo_files(repo_id) if f != ".gitattributes"]
    if held and not overwrite:
        raise UserError(
            f"{url} already holds {len(held)} files ({', '.join(held[:3])}{', ...' if len(held) > 3 else ''}); "
            "pass --overwrite to replace files of the same name, or choose another --repo-id"
        )
    operations = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(path)) for name, path in files.items()]
    api.create_commit(repo_id, operations, commit_message=f"Upload {checkpoint.name} of {Path(cfg.output_dir).name}")
    return str(url)


def explain(e: Exception, repo_id: str) -> str:
    """One line for each way the Hub refuses an upload."""
    from huggingface_hub.errors import HfHubHTTPError

    status = getattr(getattr(e, "response", None), "status_code", None)
    if isinstance(e, HfHubHTTPError) and status == 401:
        return f"the Hub rejected HF_TOKEN (expired or revoked?); create a write token at {TOKENS_PAGE}"
    if isinstance(e, HfHubHTTPError) and status == 403:
        return (
            f"HF_TOKEN may not write to {repo_id}: push to your own name or an organization you can write to, or "
            f"give the token write access there ({TOKENS_PAGE})"
        )
    if isinstance(e, HfHubHTTPError) and status == 404:
        return f"{repo_id} was not found, or HF_TOKEN cannot see it; check the name"
    if isinstance(e, ConnectionError) or "connect" in type(e).__name__.lower() or "connect" in str(e).lower():
        return "cannot reach the Hugging Face Hub (no network?); connect and run the same command again"
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return f"upload to {repo_id} failed: {text}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="the config the checkpoint was trained with")
    parser.add_argument("--repo-id", required=True, help="the Hub repository, e.g. your-name/llama-3.2-3b-chat")
    parser.add_argument("--checkpoint", type=Path, help="a checkpoints/step_N folder (default: the newest)")
    parser.add_argument("--private", action="store_true", help="create the repository private")
    parser.add_argument("--merged", action="store_true", help="also upload the merged model, into merged/")
    parser.add_argument("--gguf", action="store_true", help="also upload the checkpoint's GGUF exports")
    parser.add_argument("--overwrite", action="store_true", help="push into a repository that already holds files")
    args, overrides = parser.parse_known_args(argv)
    try:
        load_env()
        from lora_tools.config import loader

        settings = loader.load(["--config", args.config, *overrides]).settings
        url = push(settings, args.checkpoint, args.repo_id, args.private, args.merged, args.gguf, args.overwrite)
    except UserError as e:
        return fail(str(e))
    except KeyboardInterrupt:
        return fail("upload interrupted: the commit is made only once every file is uploaded; run it again")
    except Exception as e:  # every Hub failure becomes one line; the client raises many types
        return fail(explain(e, args.repo_id))
    print(f"pushed to {url}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
