"""Crane model: backbones, E-Attn/D-Attn vision encoder, prompt learner, scoring."""

from crane.models.crane import CraneModel, CraneOutput, TrainOutput
from crane.models.factory import create_model, save_model

__all__ = ["CraneModel", "CraneOutput", "TrainOutput", "create_model", "save_model"]
