"""EleutherAI's lm-evaluation-harness on a model in memory: base, base + adapter, or merged.

``TorchtuneLM`` is the harness's model interface over the recipe's own torchtune decoder, so evaluation loads
the weights the way training does (QLoRA and DoRA included) and needs no second copy in another library.
Chat-format evaluation renders prompts with ``inference.PromptFormat``: token for token the prompts the model
trained on. ``score`` runs the harness on the base (adapters off) or the finetuned model; ``report`` puts
both side by side.
"""

import contextlib
import difflib
import json
import logging
import re
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path

import lm_eval.tasks
import torch
import torch.nn.functional as F
from lm_eval import evaluator
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.tasks import TaskManager
from torchtune.modules.peft import disable_adapter

from lora_tools import REPO, checkpoints
from lora_tools.data.chat_template import SpecialTokenText
from lora_tools.errors import UserError
from lora_tools.eval.inference import PromptFormat, greedy, last_position_logits
from lora_tools.train import tracking
from lora_tools.train.decoder import Trunk
from lora_tools.train.model import eager

# Local tasks shipped with the project (the tiny demo's questions); always on the harness's search path.
EVALS_DIR = REPO / "evals"
EVAL_FILE = "eval.json"


class TorchtuneLM(TemplateLM):
    """The harness's loglikelihood / generation requests answered by a torchtune decoder.

    Text is cut into ids as the tokenizer does, except that special-token strings (``<|eot_id|>`` ...) are
    their ids, as a Hugging Face tokenizer treats them: chat-formatted contexts reach us as text.
    """

    backend = "causal"

    def __init__(self, model, tokenizer, prompt_format: PromptFormat, batch_size: int = 8, max_length: int = 2048):
        super().__init__()
        self.model, self.trunk, self.tok = model, Trunk(model), tokenizer
        self.prompt_format, self.batch_size, self.max_length = prompt_format, batch_size, max_length
        self._device = next(model.parameters()).device
        self._rank, self._world_size = 0, 1
        self._text = SpecialTokenText(tokenizer)
        self._bos = tokenizer.bos_id

    # ---- tokens ----

    @property
    def eot_token_id(self) -> int:
        return self.tok.eos_id

    @property
    def prefix_token_id(self) -> int:
        return self._bos

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        """Ids of ``string``, special-token text as its ids; BOS first unless told not to or already there."""
        ids = self._text.encode(string)
        if add_special_tokens is not False and (not ids or ids[0] != self._bos):
            ids = [self._bos, *ids]
        return ids

    def tok_decode(self, ids: list[int], **kwargs) -> str:
        return self.tok.decode(ids, skip_special_tokens=False)

    # ---- chat format: the training data's ----

    @property
    def tokenizer_name(self) -> str:
        return "lora_tools-" + self.prompt_format.name

    def chat_template(self, chat_template: bool | str = False) -> str:
        return self.prompt_format.name

    def apply_chat_template(self, chat_history: list[dict], add_generation_prompt: bool = True) -> str:
        if not add_generation_prompt:
            raise UserError("tasks that prefill the assistant turn are not supported; drop --format chat for them")
        return self.tok_decode(self.prompt_format.tokens(chat_history))

    # ---- scoring ----

    @torch.no_grad()
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """Sum of log-probabilities of each continuation, and whether greedy decoding would produce it."""
        results = []
        for start in range(0, len(requests), self.batch_size):
            chunk = requests[start : start + self.batch_size]
            rows = [(context + continuation)[-(self.max_length + 1) :][:-1] for _, context, continuation in chunk]
            width = max(map(len, rows))
            tokens = torch.tensor([r + [0] * (width - len(r)) for r in rows], device=self._device)
            hidden = self.trunk(tokens)
            for i, (_, _, continuation) in enumerate(chunk):
                end = len(rows[i])
                logits = self.model.output(hidden[i, end - len(continuation) : end]).float()
                logprobs = F.log_softmax(logits, dim=-1)
                target = torch.tensor(continuation, device=self._device)
                total = logprobs.gather(1, target[:, None]).sum().item()
                results.append((total, bool((logprobs.argmax(-1) == target).all())))
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Whole-text log-likelihood (perplexity tasks), in windows of max_length tokens."""
        out = []
        for (string,) in [r.args for r in requests]:
            windows = lm_utils.get_rolling_token_windows(
                token_list=self.tok_encode(string, add_special_tokens=False),
                prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length,
                context_len=1,
            )
            pairs = [((None, None), *lm_utils.make_disjoint_window(w)) for w in windows]
            out.append(sum(ll for ll, _ in self._loglikelihood_tokens(pairs)))
        return out

    @torch.no_grad()
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy answers, cut at the task's stop strings or the tokenizer's stop tokens."""
        out = []
        logits = last_position_logits(self.model, self.trunk)
        for context, gen_kwargs in [r.args for r in requests]:
            until = gen_kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(gen_kwargs.get("max_gen_toks", 256))
            tokens = self.tok_encode(context)[-(self.max_length - max_new) :]
            generated: list[int] = []
            text = ""
            for token in greedy(self.model, logits, tokens, max_new, self.tok.stop_tokens, self._device):
                generated.append(token)
                text = self.tok.decode(generated)
                if any(u in text for u in until):
                    break
            for u in until:
                text = text.split(u)[0]
            out.append(text)
        return out


# ---- tasks and settings ----


def task_manager(tasks: list[str], include_paths: list[Path]) -> TaskManager:
    """Our local tasks (and the config's include paths) first; the harness's own catalogue only when a task
    is not found there, since indexing its thousands of task files takes many seconds. A name that is not even in
    a quick scan of the catalogue's files fails at once."""
    paths = [str(p) for p in [EVALS_DIR, *include_paths]]
    local = TaskManager(include_path=paths, include_defaults=False)
    missing = [t for t in tasks if t not in local.all_tasks]
    if not missing:
        return local
    known = set(local.all_tasks) | catalogue_names()
    unknown = [t for t in missing if t not in known]
    if not unknown:
        manager = TaskManager(include_path=paths)
        unknown = [t for t in tasks if t not in manager.all_tasks]
        known = set(manager.all_tasks)
    if unknown:
        close = difflib.get_close_matches(unknown[0], sorted(known), n=3, cutoff=0.6)
        hint = f"; did you mean {', '.join(close)}?" if close else "; list them with: lm-eval ls tasks"
        raise UserError(f"unknown evaluation task {unknown[0]!r}{hint}")
    return manager


_NAME_LINE = re.compile(r"^[\"']?(task|group|tag)[\"']?:[ \t]*([^\s#]*)", re.MULTILINE)
_LIST_ITEM = re.compile(r"^[ \t]*-[ \t]*([^\s#]+)")


def catalogue_names() -> set[str]:
    """Every task, group and tag name the harness's own task files declare, read as text (a second or two,
    where building the TaskManager parses each file as YAML): the top-level task:, group: and tag: keys, and the
    items of such a key's list, in .yaml files and in the templates they include (files without a suffix); and
    the folder names, which most groups defined in Python share."""
    names = set()
    for path in Path(lm_eval.tasks.__file__).parent.rglob("*"):
        if path.is_dir():
            names.add(path.name)
            continue
        if path.suffix not in ("", ".yaml") and not path.name.endswith("yaml"):
            continue
        text = path.read_text(errors="replace")
        for match in _NAME_LINE.finditer(text):
            if match.group(2) not in ("", "null"):
                names.add(match.group(2).strip("'\""))
                continue
            for line in text[match.end() :].splitlines()[1:]:  # a list on the lines below
                item = _LIST_ITEM.match(line)
                if not item:
                    break
                names.add(item.group(1).strip("'\""))
    return names


@dataclass
class EvalSettings:
    """Everything that decides a score besides the model: the same for base and finetuned, and recorded."""

    tasks: list[str]
    limit: int | None = None
    num_fewshot: int | None = None
    chat_format: bool = True
    batch_size: int = 8
    seed: int = 1234
    include_paths: list[str] = field(default_factory=list)

    def check(self) -> None:
        if not self.tasks or any(not t.strip() for t in self.tasks):
            raise UserError("--tasks needs at least one task name, comma-separated (e.g. --tasks tiny_qa)")
        if self.limit is not None and self.limit < 1:
            raise UserError(f"--limit must be a whole number of samples per task, at least 1 (got {self.limit})")
        if self.num_fewshot is not None and self.num_fewshot < 0:
            raise UserError(f"--num-fewshot must be 0 or more (got {self.num_fewshot})")
        if self.batch_size < 1:
            raise UserError(f"--batch-size must be at least 1 (got {self.batch_size})")


def evaluate(lm: TorchtuneLM, settings: EvalSettings, manager: TaskManager) -> dict:
    """One harness run with ``settings``; returns the harness's results dict."""
    logging.getLogger("lm_eval").setLevel(logging.WARNING)
    try:
        return evaluator.simple_evaluate(
            model=lm,
            tasks=settings.tasks,
            task_manager=manager,
            limit=settings.limit,
            num_fewshot=settings.num_fewshot,
            apply_chat_template=settings.chat_format,
            fewshot_as_multiturn=settings.chat_format and bool(settings.num_fewshot),
            random_seed=settings.seed,
            numpy_random_seed=settings.seed,
            torch_random_seed=settings.seed,
            fewshot_random_seed=settings.seed,
            bootstrap_iters=100,  # stderr of mean metrics is closed-form; this is for the others
            log_samples=False,
        )
    except ConnectionError as e:  # datasets' "Couldn't reach '<dataset>' on the Hub (OfflineModeIsEnabled)"
        raise UserError(_offline_message(e)) from None


def _offline_message(e: Exception) -> str:
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return (
        f"a task's dataset must be downloaded from the Hugging Face Hub, which needs network ({first}); "
        "run once online (it is cached after), or use a local task file (--include-path)"
    )


def score(model, tokenizer, prompt_format: PromptFormat, settings: EvalSettings, manager, base: bool) -> dict:
    """Harness results for ``model`` as it is, or with its adapters switched off (``base``: the base model).
    A compiled model runs uncompiled (see lora_tools.train.model.eager): requests come in any width."""
    lm = TorchtuneLM(model, tokenizer, prompt_format, batch_size=settings.batch_size)
    with eager(), disable_adapter(model) if base else contextlib.nullcontext():
        return _clean(evaluate(lm, settings, manager))


def score_with_and_without_adapter(model, tokenizer, prompt_format: PromptFormat, settings: EvalSettings, manager):
    """eval.json's content for a model with adapters: scored with them off (the base) and on, in eval mode."""
    model.eval()
    base = score(model, tokenizer, prompt_format, settings, manager, base=True)
    finetuned = score(model, tokenizer, prompt_format, settings, manager, base=False)
    model.train()
    return report(settings, prompt_format, base, finetuned)


def report(settings: EvalSettings, prompt_format: PromptFormat, base: dict, finetuned: dict) -> dict:
    """What eval.json holds: the settings both runs shared, both results, the comparison rows, versions."""
    out = {
        "settings": {**asdict(settings), "prompt_format": prompt_format.name if settings.chat_format else "plain"},
        "versions": {p: _version(p) for p in ("lm_eval", "torch", "torchtune")},
        "base": base,
        "finetuned": finetuned,
    }
    out["rows"] = rows(out)
    return out


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _clean(results: dict) -> dict:
    """What eval.json keeps of a harness run: scores, sample counts, versions and the settings it recorded."""
    keep = ("results", "n-samples", "versions", "n-shot", "higher_is_better", "config")
    return {k: _jsonable(results[k]) for k in keep if k in results}


def _jsonable(value):
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, float | int | str | bool) or value is None:
        return value
    return str(value)


def rows(report: dict) -> list[dict]:
    """One row per task and metric: base, finetuned, their difference and the harness's standard errors."""
    out = []
    base, finetuned = report["base"]["results"], report["finetuned"]["results"]
    for task in finetuned:
        for key, value in finetuned[task].items():
            if "," not in key or "_stderr" in key or not isinstance(value, int | float):
                continue
            metric, flt = key.split(",", 1)
            stderr_key = f"{metric}_stderr,{flt}"
            b = base.get(task, {}).get(key)
            out.append(
                {
                    "task": task,
                    "metric": metric if flt == "none" else f"{metric} ({flt})",
                    "base": b,
                    "finetuned": value,
                    "difference": None if b is None else value - b,
                    "stderr_base": _number(base.get(task, {}).get(stderr_key)),
                    "stderr_finetuned": _number(finetuned[task].get(stderr_key)),
                }
            )
    return out


def _number(value):
    return value if isinstance(value, int | float) else None


def table(rows_: list[dict]) -> str:
    """The rows as aligned text, for the terminal and the training log."""
    task = max([16, *(len(r["task"]) + 2 for r in rows_)])
    metric = max([14, *(len(r["metric"]) + 2 for r in rows_)])
    head = f"{'task':<{task}}{'metric':<{metric}}{'base':>9}{'finetuned':>11}{'diff':>9}  stderr (base / finetuned)"
    lines = [head]
    for r in rows_:
        se = " / ".join("-" if s is None else f"{s:.4f}" for s in (r["stderr_base"], r["stderr_finetuned"]))
        diff = "" if r["difference"] is None else f"{r['difference']:+.4f}"
        base = "" if r["base"] is None else f"{r['base']:.4f}"
        lines.append(f"{r['task']:<{task}}{r['metric']:<{metric}}{base:>9}{r['finetuned']:>11.4f}{diff:>9}  {se}")
    return "\n".join(lines)


def write_report(checkpoint: Path, result: dict, merged: bool = False) -> Path:
    """eval.json in the checkpoint folder, written whole or not at all."""
    text = json.dumps({**result, "model": "merged" if merged else "base + adapter"}, indent=1) + "\n"
    return checkpoints.write_file(checkpoint / EVAL_FILE, lambda partial: partial.write_text(text))


def summary_keys(result: dict) -> dict[str, float]:
    """The rows as flat W&B summary keys: eval/<task>/<metric>/{base,finetuned,difference}."""
    out = {}
    for r in result["rows"]:
        for kind in ("base", "finetuned", "difference"):
            if r[kind] is not None:
                out[f"eval/{r['task']}/{r['metric']}/{kind}"] = r[kind]
    return out


def to_wandb(cfg, checkpoint: Path, result: dict) -> None:
    """With the W&B logger: the scores into the training run's summary (the run is resumed by its id)."""
    run_id = checkpoints.load_recipe_state(checkpoint).get("wandb_run_id")
    tracking.update_finished_run(cfg, run_id, summary_keys(result))
