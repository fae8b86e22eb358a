"""Run in the Hugging Face environment (.venv-hf: transformers + peft + lm_eval, no torchtune/torchao).

    hf_lm_eval.py --model DIR --tasks a,b --include-path DIR [--limit N] [--num-fewshot K]
                  [--batch-size N] [--seed S]

Evaluates a Hugging Face model folder with lm-evaluation-harness's "hf" model type (HFLM) on the CPU in float32, on
tasks defined only by the YAML files under --include-path (lm-eval's built-in tasks are not indexed, and nothing is
downloaded: HF_HUB_OFFLINE / HF_DATASETS_OFFLINE are set). Prints one JSON object on stdout:

    {"results": {task: {metric: value, ...}}, "configs_num_fewshot": {task: k}, "n_samples": {task: {...}}}

Everything lm-eval logs or prints goes to stderr. Non-finite numbers (a stderr over one sample) are printed as null.

BOS token (lm_eval 0.4.13, lm_eval/models/huggingface.py + lm_eval/api/model.py, with transformers 5.23):
the model is built with ``add_bos_token=True``, so for a Llama-3-style tokenizer every context starts with
``<|begin_of_text|>`` exactly once:
  * HFLM passes ``add_bos_token=True`` on to ``AutoTokenizer.from_pretrained``; for the tokenizers-backed class
    (TokenizersBackend in transformers 5) that keeps the TemplateProcessing post-processor that prepends BOS
    (``add_bos_token=False`` would rebuild it without BOS; leaving it at None keeps tokenizer.json's own default,
    which for Llama 3 also prepends BOS, but the tokenizer's ``add_bos_token`` attribute then reads False).
  * loglikelihood / multiple_choice: ``tok_encode`` calls ``tokenizer.encode(s, add_special_tokens=True)`` and
    ``_encode_pair`` encodes context+continuation in one go and splits off the context's length, so the BOS sits
    once at the front of the context and never in the continuation. An empty context becomes ``[prefix_token_id]``
    = the BOS id. A string that already starts with the BOS text (a chat template's output) is encoded with
    ``add_special_tokens=False``, so it is not doubled.
  * generate_until: ``tok_batch_encode`` calls the tokenizer with ``add_special_tokens=True`` (False when the first
    context of the batch already starts with the BOS text), padding on the left, so BOS follows the padding once.
Chat templates are not applied here (``apply_chat_template=False``).
"""

import argparse
import contextlib
import json
import math
import os
import sys

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def plain(value):
    """lm-eval's results into what json.dumps takes: numpy scalars to Python, NaN/inf to None."""
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if hasattr(value, "item") and callable(value.item) and getattr(value, "ndim", 0) == 0:
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def batch_size(text):
    return text if text.startswith("auto") else int(text)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="Hugging Face model folder (config, safetensors, tokenizer)")
    parser.add_argument("--tasks", required=True, help="comma-separated task names")
    parser.add_argument("--include-path", required=True, help="folder of task YAML files")
    parser.add_argument("--limit", type=float, default=None, help="documents per task (a fraction if below 1)")
    parser.add_argument("--num-fewshot", type=int, default=None)
    parser.add_argument("--batch-size", type=batch_size, default=1, help="an integer, or auto")
    parser.add_argument("--seed", type=int, default=1234, help="python, numpy, torch and few-shot sampling seed")
    args = parser.parse_args(argv)

    limit = args.limit
    if limit is not None and limit >= 1:
        limit = int(limit)

    # lm-eval prints some of its notices; keep stdout for the one JSON object.
    with contextlib.redirect_stdout(sys.stderr):
        import lm_eval
        from lm_eval.tasks import TaskManager

        results = lm_eval.simple_evaluate(
            model="hf",
            model_args=dict(
                pretrained=args.model,
                dtype="float32",
                device="cpu",
                add_bos_token=True,
                trust_remote_code=False,
            ),
            tasks=[t.strip() for t in args.tasks.split(",") if t.strip()],
            task_manager=TaskManager(include_path=args.include_path, include_defaults=False),
            num_fewshot=args.num_fewshot,
            batch_size=args.batch_size,  # device is in model_args: passing it here too is a TypeError
            limit=limit,
            apply_chat_template=False,
            log_samples=False,
            random_seed=args.seed,
            numpy_random_seed=args.seed,
            torch_random_seed=args.seed,
            fewshot_random_seed=args.seed,
        )

    out = {
        "results": results["results"],
        "configs_num_fewshot": {task: cfg.get("num_fewshot") for task, cfg in results["configs"].items()},
        "n_samples": results["n-samples"],
    }
    print(json.dumps(plain(out), allow_nan=False, sort_keys=True))


if __name__ == "__main__":
    main()
