"""``sync.mode=lora``: only the LoRA adapter moves; the engine applies it without a restart.

The adapter (a few MB instead of the whole model) is saved with peft's ``save_pretrained`` to
a shared-memory folder and loaded by the engine through SGLang's ``/load_lora_adapter``. Our
server wraps its base model in the adapter on the first load and overwrites the adapter weights
in place afterwards.
"""

from __future__ import annotations

import os
import shutil

import torch

from posttrain.sync.base import transfer_dir
from posttrain.sync.client import EngineClient

ADAPTER_NAME = "policy"


class LoraSync:
    name = "lora"

    def __init__(self, model: torch.nn.Module, client: EngineClient, folder: str = "") -> None:
        self.model = model
        self.client = client
        self.owns_folder = not folder
        self.folder = transfer_dir(folder, "adapter")

    def connect(self, step: int = 0) -> None:
        pass

    def push(self, version: int, step: int) -> int:
        self.model.save_pretrained(str(self.folder))  # adapter_config.json + adapter_model.safetensors
        self.client.load_lora_adapter(ADAPTER_NAME, str(self.folder))
        return os.path.getsize(os.path.join(self.folder, "adapter_model.safetensors"))

    def close(self) -> None:
        if self.owns_folder:
            shutil.rmtree(self.folder, ignore_errors=True)
