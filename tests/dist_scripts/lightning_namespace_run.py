"""``import lightning as L`` end to end: ``L.Trainer(strategy="async_pred")`` on real Gloo ranks with this package's
``lightning.pytorch`` classes (``lightning_asyncpred.L``), a step checkpoint on the global clock, ``LinearPrediction``
is left out (the owners look ahead). Writes ``<out>/rank<k>.json``. With ``--block-pytorch-lightning`` the process
cannot import ``pytorch_lightning`` (as in an environment with ``lightning`` only)."""

from __future__ import annotations

import argparse
import json
import os
import sys

if "--block-pytorch-lightning" in sys.argv:
    sys.path.insert(0, os.path.dirname(__file__))
    import block_pytorch_lightning  # noqa: F401

import torch  # noqa: E402

import lightning as L  # noqa: E402
from lightning.pytorch.callbacks import ModelCheckpoint  # noqa: E402

import lightning_asyncpred as la  # noqa: E402
from lightning_asyncpred.L import DigitsDataModule, ImageClassifier, StalenessMonitor  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--devices", type=int, default=2)
    p.add_argument("--block-pytorch-lightning", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(1)
    os.makedirs(args.out, exist_ok=True)
    L.seed_everything(0)
    ckpt = ModelCheckpoint(dirpath=os.path.join(args.out, "ckpt"), every_n_train_steps=5, save_top_k=-1)
    trainer = L.Trainer(accelerator="cpu", devices=args.devices, strategy="async_pred", max_steps=12, logger=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[ckpt, StalenessMonitor()])
    trainer.fit(ImageClassifier(arch="digits_cnn", lr=0.05), datamodule=DigitsDataModule(batch_size=32))
    with open(os.path.join(args.out, f"rank{trainer.global_rank}.json"), "w") as f:
        json.dump({"strategy": type(trainer.strategy).__module__, "global_step": trainer.global_step,
                   "top_level": la.AsyncPredStrategy.__module__, "pytorch_lightning": "pytorch_lightning" in sys.modules}, f)


if __name__ == "__main__":
    main()
    from _finish import finish  # the script's folder is on sys.path

    finish()
