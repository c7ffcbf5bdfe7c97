"""``ham-lightning predict``: the folded model's predictions, one CSV row per image."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info
from typing_extensions import override


class PredictingCLI(Protocol):
    """What predicting reads of the CLI (`ham_lightning.cli.app.HAMLightningCLI`)."""

    config_init: Any
    datamodule: Any
    model: Any
    trainer: Any
    run_dir: Path | None

    def _error(self, subcommand: str | None, message: str) -> None: ...


def write_predictions(cli: PredictingCLI) -> Path:
    """``ham-lightning predict``: the folded model's predictions among every class it has learned, for each
    image of ``--predict_path`` (or of every task's test split), written to ``<run>/predictions.csv``."""
    import csv

    import torch

    config = cli.config_init["predict"]
    ckpt_path = config.get("ckpt_path")
    if not ckpt_path:
        cli._error("predict", "predict needs --ckpt_path (a checkpoint of `ham-lightning fit`).")
    dataset, rows = predict_dataset(cli, config.get("predict_path"))
    loader = torch.utils.data.DataLoader(dataset, batch_size=cli.datamodule.eval_batch_size,
                                         num_workers=cli.datamodule.num_workers)
    cli.trainer.callbacks.append(FoldForPredict())
    outputs = cli.trainer.predict(cli.model, dataloaders=loader, ckpt_path=ckpt_path)
    logits = torch.cat([o.float() for o in outputs]) if outputs else torch.empty(0, 0)
    logits = gather_in_order(cli.trainer, logits, len(rows))
    assert cli.run_dir is not None
    path = cli.run_dir / "predictions.csv"
    if not cli.trainer.is_global_zero:
        return path  # rank 0 writes the file, with every rank's predictions
    probabilities = class_probabilities(cli.model, logits)
    probability, predicted = probabilities.max(dim=1)
    names = list(cli.datamodule.class_names or [])

    def name(k: int) -> str:
        return str(names[k]) if k < len(names) else ""

    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        labelled = bool(rows) and "label" in rows[0]
        header = [*rows[0].keys(), *(["label_name"] if labelled else []), "predicted", "predicted_name",
                  "probability"] if rows else []
        writer.writerow(header)
        for row, k, prob in zip(rows, predicted.tolist(), probability.tolist()):
            label = [name(row["label"])] if labelled else []
            writer.writerow([*row.values(), *label, k, name(k), f"{prob:.6f}"])
    summary = ""
    if rows and "label" in rows[0]:
        from torchmetrics.functional.classification import multiclass_calibration_error

        labels = torch.tensor([row["label"] for row in rows])
        accuracy = 100.0 * float((predicted.cpu() == labels).float().mean())
        ece = float(multiclass_calibration_error(probabilities.cpu(), labels, probabilities.shape[1], n_bins=15))
        summary = f" (accuracy {accuracy:.2f}%, expected calibration error {ece:.3f})"
    rank_zero_info(f"Predictions of {len(rows)} images: {path}{summary}")
    return path


def gather_in_order(trainer: Any, local: Any, total: int) -> Any:
    """Every rank's predictions in dataset order (one process: ``local`` itself). Under DDP, Lightning's predict
    sampler (`UnrepeatedDistributedSamplerWrapper`, no shuffle) gives rank ``r`` the items ``r, r + W, r + 2W...``:
    the ranks' rows are gathered (`ham_lightning.core.distributed.gather_rows`) and put back in that order."""
    import torch

    from ham_lightning.core.distributed import gather_rows

    world = int(getattr(trainer, "world_size", 1))
    if world == 1:
        return local
    gathered = gather_rows(local if local.numel() else None, local.device)  # rank 0's rows, then rank 1's...
    order = torch.cat([torch.arange(r, total, world) for r in range(world)]).to(gathered.device)
    out = torch.empty_like(gathered)
    out[order] = gathered
    return out


def class_probabilities(model: Any, logits: Any) -> Any:
    """Probabilities among the classes the model has learned: the module's calibrated ones
    (`HAMModule.probabilities`), else a softmax over the seen classes (or all, when none is marked seen)."""
    seen = getattr(getattr(model, "head", None), "seen", None)
    if seen is None or not bool(seen.any()):
        return logits.softmax(dim=1)
    if hasattr(model, "probabilities"):
        return model.probabilities(logits).float()
    return logits.masked_fill(~seen.to(logits.device), float("-inf")).softmax(dim=1)


def predict_dataset(cli: PredictingCLI, folder: str | None) -> tuple[Any, list[dict[str, Any]]]:
    """Images only (what ``predict_step`` gets) and, per image, what identifies it in the CSV."""
    import torch

    dm = cli.datamodule
    if folder is None:
        dm.setup("test")
        datasets = [dm.task_dataset(t, "test") for t in range(dm.num_tasks)]
        rows = [{"task": t, "index": i, "label": int(label)}
                for t, d in enumerate(datasets) for i, label in enumerate(d.targets().tolist())]
        return _ImagesOnly(torch.utils.data.ConcatDataset(datasets)), rows
    from ham_lightning.data.image_store import is_image_file

    files = sorted(str(p) for p in Path(folder).rglob("*") if p.is_file() and is_image_file(p.name))
    if not files:
        cli._error("predict", f"--predict_path {folder}: no image files there.")
    return _ImageFiles(files, dm.eval_transform), [{"file": f} for f in files]


class FoldForPredict(Callback):
    """Fold the merged adapters into the weights once the checkpoint is loaded: bare-backbone inference."""

    @override
    def on_predict_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        controller = getattr(pl_module, "ham", None)
        if controller is not None and hasattr(controller, "fold") and not controller.config.routing:
            controller.fold()  # a routed model runs unfolded: each input takes its own group's delta


class _ImagesOnly:
    """``(image, label)`` items as images alone: what a LightningModule's default ``predict_step`` takes."""

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Any:
        return self.dataset[index][0]


class _ImageFiles:
    """Image files decoded to RGB and given the datamodule's eval transform."""

    def __init__(self, files: list[str], transform: Any) -> None:
        self.files, self.transform = files, transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> Any:
        import torch

        from ham_lightning.data.image_store import decode_rgb

        image = torch.from_numpy(decode_rgb(self.files[index], self.files[index])).permute(2, 0, 1)
        return self.transform(image)
