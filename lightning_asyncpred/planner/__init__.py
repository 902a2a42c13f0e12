"""``asyncpred plan``: predict throughput and staleness at 2 to 256 ranks from a short measured run (pure Python).

``profile.py`` (the measured input), ``model.py`` (the discrete-event model of the transports, reusing their own
rules), ``advise.py`` (the configurations compared and the recommendation), ``cli.py`` (the command and its plots).
This package imports no Lightning.
"""

from lightning_asyncpred.planner.profile import FORMAT, Link, Profile, link_from_allreduce
from lightning_asyncpred.planner.model import Config, Perturbation, Prediction, simulate

__all__ = ["FORMAT", "Config", "Link", "Perturbation", "Prediction", "Profile", "link_from_allreduce", "simulate"]
