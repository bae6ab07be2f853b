"""Model privacy measured by attack and by weight exposure, not only by the Plug-in − Emulator FT gap.

* :func:`recover` — the recovery attack (the attacker holds only the emulator bundle and public
  text; :mod:`offsite.privacy.attack`);
* :func:`weight_exposure` — what the bundle gives away of the original middle (the owner's side;
  :mod:`offsite.privacy.exposure`);
* :func:`privacy_records` — both, plus the Plug-in reference, as results records (row ``attack``),
  for ``offsite privacy`` (:mod:`.cli`) and ``bench/privacy.py`` (:mod:`.run`); :func:`format_markdown`,
  :func:`plot_privacy` (:mod:`.report`).

See ``docs/privacy.md``.
"""

from .attack import AttackConfig, AttackResult, attack_parameters, recover
from .corpus import attack_corpus
from .exposure import ExposureReport, weight_exposure
from .report import format_markdown, plot_privacy
from .run import gap_closed, parse_budgets, privacy_records, run_privacy

__all__ = ["AttackConfig", "AttackResult", "ExposureReport", "attack_corpus", "attack_parameters",
           "format_markdown", "gap_closed", "parse_budgets", "plot_privacy", "privacy_records", "recover",
           "run_privacy", "weight_exposure"]
