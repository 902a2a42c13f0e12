"""lightning-asyncpred: asynchronous data-parallel training with linear parameter prediction for Lightning.

Works with either Lightning namespace (``_namespace.py``): ``lightning_asyncpred.pl`` holds the classes for
``import pytorch_lightning as pl``, ``lightning_asyncpred.L`` those for ``import lightning as L``, from one source.
``lightning_asyncpred.AsyncPredStrategy`` and the other names here are the ``pytorch_lightning`` ones when that package is
installed, else the ``lightning.pytorch`` ones. The strategies (``async_pred``, ``async_pred_allreduce``,
``async_pred_sim``, ...) are registered in the ``StrategyRegistry`` of every namespace the process imports, before
or after this package, so ``Trainer(strategy="async_pred")`` works with either Trainer.
"""

import sys as _sys

from lightning_asyncpred import _namespace

_namespace.install()
_namespace.activate(_namespace.default_namespace())
for _ns in _namespace.NAMESPACES:
    if _ns in _sys.modules:  # imported before this package
        _namespace.activate(_ns)

if _namespace.default_namespace() == "pytorch_lightning":
    from lightning_asyncpred._api import *  # noqa: F401,F403,E402
    from lightning_asyncpred._api import __all__  # noqa: F401,E402
else:
    from lightning_asyncpred.L import *  # noqa: F401,F403,E402
    from lightning_asyncpred.L import __all__  # noqa: F401,E402

__version__ = "0.1.0"
