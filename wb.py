"""Log in to Weights & Biases with the key from .env, and say in one line what happened.

    python wb.py            # reads WANDB_API_KEY from the environment or ./.env

Exit status: 0 logged in (or W&B is set to offline/disabled), 2 no key, a key of the wrong shape or a malformed
.env, 1 key rejected or W&B unreachable.
The key is never printed. To train without network, set WANDB_MODE=offline and later run
`wandb sync wandb/offline-run-*` to upload the runs.
"""

import argparse
import os
import socket
import sys
from urllib.parse import urlsplit

from lora_tools.config.env import load_env, wandb_key_shape_error
from lora_tools.errors import UserError, fail


def reachable(url: str, timeout: float = 5.0) -> bool:
    """Can we open a TCP connection to the W&B server? Skipped (assumed yes) behind an HTTP proxy."""
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy")):
        return True
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        socket.create_connection((parts.hostname, port), timeout).close()
        return True
    except OSError:
        return False


def no_network(url: str) -> int:
    print(
        f"error: could not reach W&B at {url} to check the key; to train without network set WANDB_MODE=offline "
        "and upload later with `wandb sync wandb/offline-run-*`",
        file=sys.stderr,
    )
    return 1


def main(argv=None) -> int:
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args(argv)
    try:
        env_file = load_env()
    except UserError as e:
        return fail(str(e))
    mode = os.environ.get("WANDB_MODE", "").strip().lower()
    if mode in ("offline", "disabled"):
        print(f"W&B is {mode} (WANDB_MODE={mode}): no login needed; runs are written under ./wandb.")
        return 0
    key = os.environ.get("WANDB_API_KEY", "").strip()
    if not key:
        where = f"{env_file}" if env_file else ".env (copy .env.example to .env)"
        print(f"error: WANDB_API_KEY is not set; put it in {where}, from https://wandb.ai/authorize", file=sys.stderr)
        return 2
    error = wandb_key_shape_error(key)  # before any network: wandb would report a short key as a failed login
    if error:
        return fail(str(error))

    import wandb

    base_url = os.environ.get("WANDB_BASE_URL") or wandb.Settings().base_url
    if not reachable(base_url):
        return no_network(base_url)
    try:
        ok = wandb.login(key=key, verify=True, relogin=True)
    except wandb.errors.AuthenticationError as e:
        # wandb reports a server that never answers as an authentication failure too.
        if any(s in str(e).lower() for s in ("did not respond", "execute api request", "connect", "timed out")):
            return no_network(base_url)
        print("error: W&B rejected WANDB_API_KEY; copy a fresh key from https://wandb.ai/authorize", file=sys.stderr)
        return 1
    except Exception:  # network failures surface as several exception types
        return no_network(base_url)
    if not ok:
        print("error: W&B login failed; copy a fresh key from https://wandb.ai/authorize", file=sys.stderr)
        return 1
    print("W&B: logged in; runs will be logged to your account.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
