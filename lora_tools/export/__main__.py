"""Write the merged model (base weights with the adapter folded in, Hugging Face format) for a checkpoint,
and GGUF files for llama.cpp and Ollama.

    python -m lora_tools.export --config lora_finetune_single_device.yaml                # the newest checkpoint
    python -m lora_tools.export --config ... --checkpoint outputs/.../checkpoints/step_0000300
    python -m lora_tools.export --config ... --gguf --quant q8_0,q4_k_m     # + checkpoint/gguf/, from model/
    python -m lora_tools.export --config ... --gguf --base                  # the base model: output_dir/base-gguf/
    python -m lora_tools.export --config ... --gguf-adapter   # checkpoint/gguf-adapter/: a LoRA GGUF + Modelfile
    python -m lora_tools.export --config ... --vllm      # the `vllm serve` lines for the checkpoint (docs/serving.md)

Training writes the merged model only into the last checkpoint of a run, so that a step checkpoint (or a
stop on Ctrl-C/SIGTERM) saves just the small adapter and the resume state. This command adds ``model/`` to
any checkpoint: it reads the base weights named by the config and the checkpoint's adapter, on the CPU.
"""

import argparse
import os
import sys
from pathlib import Path

import torch
from omegaconf import OmegaConf
from torchtune import config, training, utils

from lora_tools import checkpoints
from lora_tools.checkpoints import lock
from lora_tools.config import loader, preflight
from lora_tools.config.settings import as_list
from lora_tools.data import chat_template
from lora_tools.data.sft import own_data_section
from lora_tools.errors import UserError, fail
from lora_tools.export import gguf_export, hf_export, vllm_serve

log = utils.get_logger("INFO")


def export(loaded: loader.Loaded, checkpoint: Path | None) -> Path:
    """Merge the checkpoint's adapter into the config's base weights; returns the model/ folder written."""
    cfg, merge_base = loaded.cfg, loaded.settings.qlora_merge_base
    preflight.check_model_files(cfg)
    checkpoint = checkpoints.resolve(cfg.output_dir, checkpoint)
    adapter = checkpoints.load_recipe_state(checkpoint)["adapter"]
    # torchtune's checkpointer wants an output_dir; it writes nothing there when only loading.
    ckpt_cfg = OmegaConf.merge(cfg.checkpointer, {"output_dir": str(checkpoint)})
    base = config.instantiate(ckpt_cfg).load_checkpoint()[training.MODEL_KEY]
    base = hf_export.as_trained(
        base, cfg.model, merge_base, training.get_dtype(loaded.settings.dtype, torch.device("cpu"))
    )
    spec = hf_export.AdapterSpec.from_model_config(cfg.model)
    return hf_export.write_merged_model(checkpoint, base, adapter, spec, Path(cfg.checkpointer.checkpoint_dir))


def training_template(cfg, base: bool) -> str:
    """The chat template for the GGUF: the one training rendered with (its date set inside), or for --base
    the model's own. torchtune's builders train in the plain Llama 3 format."""
    if base:
        return chat_template.read_template(str(cfg.checkpointer.checkpoint_dir))[0]
    own = own_data_section(cfg)
    if own is None:
        first = as_list(cfg.dataset)[0]
        log.warning(
            f"{first._component_} trains in torchtune's Llama 3 format (no system block, alpaca data wrapped in "
            "the alpaca prompt): the GGUF's template is the plain Llama 3 format"
        )
        return chat_template.LLAMA3_TEMPLATE
    date = own.chat_template_kwargs.get("date_string", chat_template.TEMPLATE_DATE.strftime("%d %b %Y"))
    return gguf_export.pinned_template(chat_template.read_template(own.chat_template)[0], date)


def write_modelfile(out_dir: Path, gguf_path: str, template: str, adapter: str | None = None) -> None:
    """The Modelfile, after checking that Ollama would render what the template renders."""
    variables = {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}

    def render(messages):
        return chat_template.render_template(template, messages, True, variables)

    ollama = gguf_export.ollama_template(render)
    probes = [
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}, {"role": "assistant",
         "content": "Hello"}, {"role": "user", "content": "Bye"}],
        [{"role": "user", "content": "Hi"}],
    ]  # fmt: skip
    for probe in probes:
        if gguf_export.ollama_render(ollama, probe) != render(probe).removeprefix("<|begin_of_text|>"):
            log.warning("the Modelfile's template does not render as the training template does; check it")
            break
    (out_dir / "Modelfile").write_text(gguf_export.modelfile(gguf_path, ollama, adapter))


def export_gguf(cfg, checkpoint: Path | None, base: bool, quants: list[str]) -> list[Path]:
    """GGUF files of a checkpoint's merged model (or of the base model), an Ollama Modelfile and a README."""
    if base:
        model_dir, out_dir = Path(cfg.checkpointer.checkpoint_dir), Path(cfg.output_dir) / "base-gguf"
        preflight.check_model_files(cfg)
    else:
        checkpoint = checkpoints.resolve(cfg.output_dir, checkpoint, merged=True)
        model_dir, out_dir = checkpoint / checkpoints.MERGED, checkpoint / "gguf"
    name = Path(cfg.output_dir).name if not base else Path(cfg.checkpointer.checkpoint_dir).name
    template = training_template(cfg, base)
    files = gguf_export.export(model_dir, out_dir, quants, name, template)
    smallest = min(files, key=lambda f: gguf_export.QUANT_TYPES[f.stem.removeprefix("model-")][1]).name
    write_modelfile(out_dir, f"./{smallest}", template)
    (out_dir / "README.md").write_text(
        f"# {name} (GGUF)\n\n"
        + "".join(f"- `{f.name}`\n" for f in files)
        + f"\nRun it:\n\n```bash\nollama create {name.lower()} -f Modelfile && ollama run {name.lower()}\n"
        f"llama-cli -m {smallest} -cnv --jinja\nllama-server -m {smallest} --jinja\n```\n"
    )
    return files


def print_vllm(loaded: loader.Loaded, checkpoint: Path | None) -> None:
    """The training template next to the adapter, then the `vllm serve` commands that use it."""
    checkpoint = checkpoints.resolve(loaded.cfg.output_dir, checkpoint)
    template = vllm_serve.write_template(checkpoint, training_template(loaded.cfg, base=False))
    commands, notes = vllm_serve.serve_lines(loaded.cfg, loaded.settings.dtype, checkpoint, template)
    for command in commands:
        print(command)
    for note in notes:
        log.warning(note)


def export_gguf_adapter(cfg, checkpoint: Path | None) -> list[Path]:
    """The checkpoint's adapter as a llama.cpp LoRA GGUF in its gguf-adapter/ folder, with a Modelfile and a
    README that apply it to the base model's f16 GGUF (output_dir/base-gguf/, exported the first time, then
    reused by every checkpoint and run that shares output_dir)."""
    checkpoint = checkpoints.resolve(cfg.output_dir, checkpoint)
    base = Path(cfg.output_dir) / "base-gguf" / "model-f16.gguf"
    if not base.is_file():
        export_gguf(cfg, None, True, ["f16"])
    out_dir = checkpoint / "gguf-adapter"
    out_dir.mkdir(exist_ok=True)
    final, partial = out_dir / "adapter-f16.gguf", out_dir / ".tmp-adapter-f16.gguf"
    try:
        config = hf_export.base_config(Path(cfg.checkpointer.checkpoint_dir))
        gguf_export.write_lora(checkpoint / checkpoints.ADAPTER, config, partial, Path(cfg.output_dir).name)
        os.replace(partial, final)
    finally:
        partial.unlink(missing_ok=True)
    base_path = os.path.relpath(base, out_dir)
    write_modelfile(out_dir, base_path, training_template(cfg, False), adapter=f"./{final.name}")
    name = Path(cfg.output_dir).name.lower()
    (out_dir / "README.md").write_text(
        f"# {Path(cfg.output_dir).name} (LoRA GGUF)\n\n`{final.name}` applies to the base model's `{base_path}`.\n\n"
        f"```bash\nollama create {name} -f Modelfile && ollama run {name}\n"
        f"llama-cli -m {base_path} --lora {final.name} -cnv --jinja\n"
        f"llama-server -m {base_path} --lora {final.name} --jinja\n```\n"
    )
    return [base, final]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="the config the checkpoint was trained with")
    parser.add_argument("--checkpoint", type=Path, help="a checkpoints/step_N folder (default: the newest)")
    parser.add_argument(
        "--gguf", action="store_true", help="write GGUF files (llama.cpp, Ollama) from the merged model"
    )
    parser.add_argument("--quant", default="f16", help="with --gguf: f16 and/or quantizations, e.g. f16,q8_0,q4_k_m")
    parser.add_argument("--base", action="store_true", help="with --gguf: export the base model instead")
    parser.add_argument("--vllm", action="store_true", help="print the `vllm serve` commands for the checkpoint")
    parser.add_argument(
        "--gguf-adapter", action="store_true", help="write the adapter as a llama.cpp LoRA GGUF, on the base's GGUF"
    )
    args, overrides = parser.parse_known_args(argv)
    if not args.gguf and (args.base or args.quant != "f16"):
        return fail("--quant and --base go with --gguf; add --gguf")
    try:
        loaded = loader.load(["--config", args.config, *overrides])  # the same typo and value checks as training
        cfg = loaded.cfg
        if not args.base:  # a run still writing the checkpoints: wait for it
            lock.check_not_running(cfg.output_dir, args.checkpoint)
        if args.vllm:
            print_vllm(loaded, args.checkpoint)
            return 0
        if args.gguf or args.gguf_adapter:
            try:
                if args.gguf_adapter:
                    files = export_gguf_adapter(cfg, args.checkpoint)
                else:
                    files = export_gguf(cfg, args.checkpoint, args.base, gguf_export.parse_quants(args.quant))
            except OSError as e:  # disk full, permissions: the partial file is already removed
                raise UserError(
                    f"GGUF export failed: {e.strerror or e} ({e.filename or 'output'}); nothing partial left"
                )
            for path in files:
                print(f"GGUF: {path} ({path.stat().st_size / 1e6:.1f} MB)")
            return 0
        folder = export(loaded, args.checkpoint)
    except UserError as e:
        return fail(str(e))
    print(f"merged model (HF): {folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
