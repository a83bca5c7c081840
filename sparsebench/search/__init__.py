"""Searches (`sparsebench search`): Random Search, EvoPress and DASS, registered in SEARCHES."""
from sparsebench.search import dass, evopress, random_search  # noqa: F401  (registration)
from sparsebench.search.base import SEARCHES, Search, SearchJob, arm_config, plan_search

__all__ = ["SEARCHES", "Search", "SearchJob", "arm_config", "plan_search"]
