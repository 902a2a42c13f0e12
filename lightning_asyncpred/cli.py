"""``asyncpred``: the Lightning CLI for this package (``asyncpred fit|validate|test --config recipe.yaml``)."""

from __future__ import annotations

import sys
from typing import Any, Optional

import pytorch_lightning as pl
from pytorch_lightning.cli import LightningCLI
from pytorch_lightning.utilities import rank_zero_only

import lightning_asyncpred  # noqa: F401  (registers the strategies)
from lightning_asyncpred.module import ImageClassifier


class AsyncPredCLI(LightningCLI):
    """LightningCLI over :class:`ImageClassifier` and any ``LightningDataModule``.

    Adds ``--test_after_fit`` (run the test split with the final weights after ``fit``) and prints a
    summary: test accuracy and the strategy's staleness statistics.
    """

    def add_arguments_to_parser(self, parser: Any) -> None:
        parser.add_argument("--test_after_fit", type=bool, default=False, help="run `test` after `fit` and print a summary")

    def after_fit(self) -> None:
        results: Optional[list[dict[str, float]]] = None
        if self.config[self.subcommand].get("test_after_fit"):
            results = self.trainer.test(self.model, datamodule=self.datamodule, verbose=False)
        self._summary(results)

    @rank_zero_only
    def _summary(self, results: Optional[list[dict[str, float]]]) -> None:
        strategy = self.trainer.strategy
        lines = [f"strategy: {type(strategy).__name__}, world size {self.trainer.world_size}, steps {self.trainer.global_step}"]
        if results:
            metrics = results[0]
            acc = ", ".join(f"{k} {v:.4f}" for k, v in sorted(metrics.items()) if k.startswith("test/acc"))
            lines.append(f"test: {acc}")
        stats = getattr(strategy, "staleness_stats", None)
        if stats is not None:
            lines.append(stats.summary())
        for cb in self.trainer.callbacks:
            ratios = getattr(cb, "error_ratios", None)
            if ratios:
                lines.append(f"prediction error ratio: mean {sum(ratios) / len(ratios):.3f} over {len(ratios)} probes")
        print("\n".join(lines), flush=True)


def main(args: Optional[list[str]] = None) -> None:
    AsyncPredCLI(
        ImageClassifier,
        pl.LightningDataModule,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        args=args,
    )


if __name__ == "__main__":  # pragma: no cover
    main(sys.argv[1:])
