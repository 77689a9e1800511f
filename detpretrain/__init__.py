"""detpretrain: detection-oriented pre-trained CNN backbones as a timm zoo.

``import detpretrain`` registers every zoo row as a timm pretrained tag and installs the load hook that gives zoo
weights their own error messages, so that ``timm.create_model("resnext101_32x8d.predet", pretrained=True)``
downloads its safetensors from the Hugging Face Hub or says exactly what is missing.
"""

from detpretrain.hub import install_timm_load_hook, load_weights, save_pretrained
from detpretrain.zoo import ZOO, PaperResult, ZooEntry, get_entry, pretrained_cfg, register_entry, register_with_timm

__version__ = "0.1.0"

__all__ = [
    "ZOO",
    "PaperResult",
    "ZooEntry",
    "get_entry",
    "load_weights",
    "pretrained_cfg",
    "register_entry",
    "save_pretrained",
    "__version__",
]

register_with_timm()
install_timm_load_hook()
