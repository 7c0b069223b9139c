"""Weight sync: moving the trainer's weights to the rollout engine, and deciding when.

One module per mode (``shared``, ``broadcast``, ``checkpoint``, ``lora``) behind the registry in
``driver.py``; ``cadence.py`` decides when; ``client.py`` drives the SGLang-compatible endpoints
of `posttrain serve` or of an SGLang server; ``receiver.py`` is the engine's side of them.
See docs/weight_sync.md.
"""

from posttrain.sync.base import SyncError, WeightSync
from posttrain.sync.cadence import SyncCadence
from posttrain.sync.client import EngineClient
from posttrain.sync.driver import SYNC_MODES, WeightSyncDriver, build_weight_sync, resolve_sync_mode

__all__ = ["SYNC_MODES", "EngineClient", "SyncCadence", "SyncError", "WeightSync", "WeightSyncDriver", "build_weight_sync",
           "resolve_sync_mode"]
