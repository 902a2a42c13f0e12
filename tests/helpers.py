"""Small shared helpers for the Lightning-level tests."""

import torch

import pytorch_lightning as pl
from lightning_asyncpred import DigitsDataModule, ImageClassifier


def trainer(tmp_path, callbacks=(), **kwargs):
    defaults = dict(
        accelerator="cpu",
        devices=1,
        max_steps=12,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=1,
        default_root_dir=str(tmp_path),
    )
    defaults.update(kwargs)
    return pl.Trainer(callbacks=list(callbacks), **defaults)


def model_and_data(lr=0.1, momentum=0.0, batch_size=16, **kwargs):
    torch.manual_seed(0)
    return ImageClassifier(arch="digits_cnn", lr=lr, momentum=momentum, **kwargs), DigitsDataModule(batch_size=batch_size)


def real_params(module):
    return [p.detach().clone() for p in module.parameters()]


class EpochSchedulerClassifier(ImageClassifier):
    """SGD with a StepLR that halves the learning rate after every epoch (a scheduler with interval "epoch")."""

    def configure_optimizers(self):
        optimizer = torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=self.hparams.momentum)
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}


class ManualClassifier(ImageClassifier):
    """Manual optimization: one step of its optimizer per batch in ``training_step``."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        opt = self.optimizers()
        x, y = batch
        loss = torch.nn.functional.cross_entropy(self(x), y)
        opt.zero_grad()
        self.manual_backward(loss)
        opt.step()
        # synced at the epoch end: under the shared batch pool a per-step collective is refused
        self.log("train/loss", loss, on_step=False, on_epoch=True, sync_dist=True)
        return loss
