"""Networks of imported models (TorchScript, ONNX, MONAI bundles, plain state dicts), loaded safely.

`Model.load_network` calls `load_imported_network` after the weights were verified; nothing here
unpickles (state dicts load with weights_only=True) or runs code from a bundle config.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from deepmri.errors import ModelError
from deepmri.models.card import sha256_of


def load_imported_network(model: Any) -> torch.nn.Module:
    """The network of an imported model (called by `Model.load_network` after verification)."""
    fmt = model.card.weights_format
    if fmt == "torchscript":
        network = load_torchscript(model.weights_path, model.card.id)
    elif fmt == "onnx":
        network = OnnxNetwork(model.weights_path, model.card.id)
    elif fmt == "monai-bundle":
        network = load_bundle_network(model)
    else:
        raise ModelError(f"Model '{model.card.id}': unknown weights format '{fmt}'.")
    if model.card.input.get("axis_order", "zyx") == "xyz":
        network = AxisOrderAdapter(network)
    return network


class AxisOrderAdapter(torch.nn.Module):
    """Runs a network trained on (x, y, z) arrays (MONAI's LoadImage) on DeepMRI's (z, y, x)."""

    def __init__(self, network: torch.nn.Module) -> None:
        super().__init__()
        self.network = network

    def forward(self, tensor: torch.Tensor) -> torch.Tensor:
        order = (0, 1, *range(tensor.ndim - 1, 1, -1))
        return self.network(tensor.permute(order)).permute(order)


class OnnxNetwork(torch.nn.Module):
    """An ONNX graph run by onnxruntime behind the torch.nn.Module interface the engine calls."""

    def __init__(self, path: str | os.PathLike, model_id: str = "") -> None:
        super().__init__()
        try:
            import onnxruntime
        except ImportError:
            raise ModelError(
                f"Model '{model_id or Path(path).name}' is an ONNX model and needs onnxruntime, "
                "which is not installed: run 'pip install onnxruntime' (in Slicer: "
                "slicer.util.pip_install('onnxruntime')), then try again."
            ) from None
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        available = onnxruntime.get_available_providers()
        providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
        try:
            self.session = onnxruntime.InferenceSession(
                str(path), sess_options=options, providers=providers
            )
        except Exception as error:  # onnxruntime raises its own untyped errors
            raise ModelError(
                f"Model '{model_id}': onnxruntime cannot open {Path(path).name} ({error})."
            ) from error
        graph_input = self.session.get_inputs()[0]
        self.input_name = graph_input.name
        batch = graph_input.shape[0] if graph_input.shape else None
        self.fixed_batch = batch if isinstance(batch, int) else None

    def forward(self, tensor: torch.Tensor) -> torch.Tensor:
        array = tensor.detach().float().cpu().numpy()
        if self.fixed_batch == 1 and array.shape[0] > 1:
            outputs = [self.session.run(None, {self.input_name: item[None]})[0] for item in array]
            result = torch.from_numpy(np.concatenate(outputs))
        else:
            result = torch.from_numpy(self.session.run(None, {self.input_name: array})[0])
        return result.to(tensor.device)


def load_state_dict(path: Path, model_id: str) -> dict[str, torch.Tensor]:
    """Tensors only (`weights_only=True`): a file that needs arbitrary unpickling is refused."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises UnpicklingError, RuntimeError, ...
        raise ModelError(
            f"Model '{model_id}': {path.name} is not a plain state dict that can be loaded "
            f"safely (weights only) ({str(error).splitlines()[0]})."
        ) from error
    for key in ("model", "state_dict", "network"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelError(f"Model '{model_id}': {path.name} does not hold a state dict of tensors.")
    return state


def load_torchscript(path: Path, model_id: str) -> torch.nn.Module:
    try:
        return torch.jit.load(str(path), map_location="cpu")
    except Exception as error:  # torch.jit raises RuntimeError with long C++ traces
        raise ModelError(
            f"Model '{model_id}': {path.name} is not a TorchScript file that loads here "
            f"({str(error).splitlines()[0]})."
        ) from error


def load_bundle_network(model: Any) -> torch.nn.Module:
    """Build the bundle's `network_def` with MONAI's ConfigParser, then load its state dict."""
    from monai.bundle import ConfigParser

    config = model.card.architecture.get("config") or {}
    config_file = (model.path / config.get("config_file", "configs/inference.json")).resolve()
    if model.path.resolve() not in config_file.parents:
        raise ModelError(
            f"Model '{model.card.id}': card.json field 'architecture.config.config_file' must be "
            f"a file inside the model folder, got {config.get('config_file')!r}."
        )
    expected = config.get("config_sha256")
    if expected and config_file.is_file() and sha256_of(config_file) != expected:
        raise ModelError(
            f"Model '{model.card.id}': {config_file.name} was changed since the import (sha256 "
            "differs from the card); it will not be used. Import the bundle again."
        )
    key = config.get("network_def", "network_def")
    parser = ConfigParser()
    try:
        parser.read_config(str(config_file))
    except Exception as error:  # MONAI raises ValueError/FileNotFoundError/yaml errors
        raise ModelError(f"Model '{model.card.id}': cannot read {config_file} ({error}).") from None
    if key not in parser:
        raise ModelError(f"Model '{model.card.id}': {config_file.name} has no '{key}' entry.")
    _refuse_code(parser, key, model.card.id, set())
    try:
        network = parser.get_parsed_content(key)
    except Exception as error:  # whatever the network constructor raises
        raise ModelError(
            f"Model '{model.card.id}': MONAI cannot build '{key}' from {config_file.name} ({error})."
        ) from error
    try:
        network.load_state_dict(load_state_dict(model.weights_path, model.card.id))
    except RuntimeError as error:
        raise ModelError(
            f"Model '{model.card.id}': models/model.pt does not fit '{key}' "
            f"({str(error).splitlines()[0]})."
        ) from error
    return network


def _refuse_code(parser: Any, key: str, model_id: str, seen: set[str]) -> None:
    """Refuse '$' expressions (Python eval) and non-MONAI targets in what builds the network."""
    if key in seen:
        return
    seen.add(key)

    def walk(value: Any, where: str) -> None:
        if isinstance(value, str):
            if value.startswith(("$", "%")):
                raise ModelError(
                    f"Model '{model_id}': bundle config '{where}' is Python code or a macro "
                    f"({value[:40]}); DeepMRI builds only plain network definitions."
                )
            for reference in re.findall(r"@([\w:#]+)", value):
                _refuse_code(parser, reference.replace("#", "::"), model_id, seen)
        elif isinstance(value, dict):
            for name, item in value.items():
                walk(item, f"{where}::{name}")
            target = value.get("_target_")
            if (
                isinstance(target, str)
                and "." in target
                and not target.startswith(("monai.", "torch.nn."))
            ):
                raise ModelError(
                    f"Model '{model_id}': bundle config '{where}' builds {target}; only MONAI "
                    "and torch.nn networks are imported."
                )
            if value.get("_mode_", "default") != "default":
                raise ModelError(f"Model '{model_id}': bundle config '{where}' sets _mode_.")
        elif isinstance(value, list):
            for index, item in enumerate(value):
                walk(item, f"{where}::{index}")

    try:
        walk(parser[key], key)
    except KeyError:
        raise ModelError(f"Model '{model_id}': bundle config refers to missing '{key}'.") from None
