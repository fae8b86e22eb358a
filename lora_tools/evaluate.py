"""Did finetuning help? lm-evaluation-harness scores of the base model and of the finetuned one, side by side.

    python -m lora_tools.evaluate --config configs/tiny.yaml --tasks tiny_qa,tiny_qa_gen     # offline demo tasks
    python -m lora_tools.evaluate --config lora_finetune_single_device.yaml --tasks hellaswag,arc_easy --limit 500
    python -m lora_tools.evaluate --config ... --checkpoint outputs/.../step_0000300 --merged --num-fewshot 5

Both models are scored with the same harness settings (recorded in the output): the base with the adapter
switched off, the finetuned with the newest checkpoint's adapter (--checkpoint picks another; --merged loads
its merged model/ instead). By default prompts are rendered in the training data's format, as the model was
trained (--format plain scores raw text, as the harness does for base models). The table goes to the terminal
and to eval.json in the checkpoint folder; with the W&B logger, to the run's summary too. Tasks are the
harness's (Hub datasets: need network the first time) or local YAML task files (--include-path, and evals/
here). Extra key=value arguments override the config as with `tune run` (e.g. device=cuda).
"""

import argparse
import sys
from pathlib import Path

from torchtune import config

from lora_tools import checkpoints
from lora_tools.checkpoints import lock
from lora_tools.config import loader, preflight
from lora_tools.config.env import load_env
from lora_tools.errors import UserError, fail
from lora_tools.eval import harness
from lora_tools.eval.inference import PromptFormat, load_model


def _whole_number(name: str):
    def parse(text: str) -> int:
        try:
            return int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be a whole number (got {text!r})") from None

    return parse


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("--tasks", required=True, help="comma-separated task names, e.g. hellaswag,arc_easy")
    parser.add_argument("--checkpoint", type=Path, help="a checkpoints/step_N folder (default: the newest)")
    parser.add_argument("--merged", action="store_true", help="score the checkpoint's merged model/")
    parser.add_argument("--limit", type=_whole_number("--limit"), help="at most this many samples per task")
    parser.add_argument("--num-fewshot", type=_whole_number("--num-fewshot"), help="examples in each prompt")
    parser.add_argument("--format", choices=["chat", "plain"], default="chat", help="prompt format (default: chat)")
    parser.add_argument("--batch-size", type=_whole_number("--batch-size"), default=8)
    parser.add_argument("--include-path", type=Path, action="append", default=[], help="a folder of task YAMLs")
    args, overrides = parser.parse_known_args(argv)
    try:
        load_env()  # .env: WANDB_API_KEY for the run summary, HF_TOKEN for gated Hub datasets
        cfg = loader.load(["--config", args.config, *overrides]).cfg  # the same typo and value checks as training
        lock.check_not_running(cfg.output_dir, args.checkpoint)
        preflight.check_wandb(cfg)  # before minutes of scoring, not after
        eval_settings = harness.EvalSettings(
            tasks=[t.strip() for t in args.tasks.split(",")],
            limit=args.limit,
            num_fewshot=args.num_fewshot,
            chat_format=args.format == "chat",
            batch_size=args.batch_size,
            seed=cfg.seed if cfg.get("seed") is not None else 1234,
            include_paths=[str(p) for p in args.include_path],
        )
        eval_settings.check()
        for path in args.include_path:
            if not path.is_dir():
                raise UserError(f"--include-path {path} is not a folder of task YAML files")
        manager = harness.task_manager(eval_settings.tasks, args.include_path)
        tokenizer = config.instantiate(cfg.tokenizer)
        prompts = PromptFormat(cfg, tokenizer)
        checkpoint = checkpoints.resolve(cfg.output_dir, args.checkpoint, args.merged)  # a missing model/: now
        model, _ = load_model(cfg, checkpoint, merged=False)  # base + adapter: the base is it, adapter off
        base = harness.score(model, tokenizer, prompts, eval_settings, manager, base=True)
        if args.merged:
            del model
            model, _ = load_model(cfg, checkpoint, merged=True)
        finetuned = harness.score(model, tokenizer, prompts, eval_settings, manager, base=False)
        report = harness.report(eval_settings, prompts, base, finetuned)
        path = harness.write_report(checkpoint, report, merged=args.merged)
    except UserError as e:
        return fail(str(e))
    print(harness.table(report["rows"]))
    print(f"results: {path}")
    harness.to_wandb(cfg, checkpoint, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
