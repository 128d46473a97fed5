"""MLflow tracking for every stage: rank-0-only runs, parent/child runs, standard tags, registry.

    from app.tracking import get_tracker
    with get_tracker().start("pretrain", config=cfg) as run:
        run.log_metrics({"loss": 1.0}, step=1)
"""

from app.tracking.registry import get_version_by_alias, set_alias
from app.tracking.store import dinoctl_home, embedded_store, tracking_uri
from app.tracking.tracker import NullTracker, Tracker, get_tracker, global_rank, standard_tags

__all__ = [
    "NullTracker", "Tracker", "dinoctl_home", "embedded_store", "get_tracker", "global_rank",
    "standard_tags", "tracking_uri", "set_alias", "get_version_by_alias",
]
