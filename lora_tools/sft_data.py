"""The dataset builders' first home, kept so that configs written before they moved keep working: a
``_component_: lora_tools.sft_data.conversation_dataset`` (or ``instruction_dataset``) builds the same dataset as
``lora_tools.data.sft``'s."""

from lora_tools.data.sft import conversation_dataset, instruction_dataset

__all__ = ["conversation_dataset", "instruction_dataset"]
