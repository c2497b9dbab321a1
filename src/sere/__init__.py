"""SERE: feature self-relation for self-supervised Vision Transformers (Li, Gao, Cheng, 2023)."""

from sere.api import ForwardBackward, LoadedRun, SEREPretraining, compute_losses, load_run
from sere.config import Config, apply_overrides, config_from_dict, load_config
from sere.geometry import CropBox, overlap_grids
from sere.errors import SereError
from sere.io.export import export_backbone
from sere.io.pretrained import load_pretrained_weights
from sere.losses.objective import LossTerms, SEREObjective, SERELoss
from sere.losses.relation import channel_relation, spatial_relation
from sere.models.backbone import BackboneOutput, ViTBackbone
from sere.models.network import Networks, SERENetwork, build_networks

__version__ = "0.1.0"

__all__ = [
    "BackboneOutput", "Config", "CropBox", "ForwardBackward", "LoadedRun", "LossTerms", "Networks",
    "SereError", "SEREObjective", "SERELoss", "SERENetwork", "SEREPretraining", "ViTBackbone",
    "apply_overrides", "build_networks", "channel_relation", "compute_losses", "config_from_dict",
    "export_backbone", "load_config", "load_pretrained_weights", "load_run", "overlap_grids",
    "spatial_relation",
]
