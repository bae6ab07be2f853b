"""Model privacy measured by attack and by weight exposure, not only by the Plug-in − Emulator FT gap.

* :func:`recover` — the recovery attack (the attacker holds only the emulator bundle and public
  text; :mod:`offsite.privacy.attack`);
* :func:`weight_exposure` — what the bundle gives away of the original middle (the owner's side;
  :mod:`offsite.privacy.exposure`);
* :func:`format_markdown`, :func:`plot_privacy` (:mod:`.report`): the table and plot of the records
  that :func:`offsite.experiment.privacy.privacy_records` writes (both, plus the Plug-in reference,
  row ``attack``) for ``offsite privacy`` (:mod:`.cli`) and ``bench/privacy.py``.

See ``docs/privacy.md``.
"""

from .attack import AttackConfig, AttackResult, attack_parameters, recover
from .corpus import attack_corpus
from .exposure import ExposureReport, weight_exposure
from .report import format_markdown, plot_privacy

__all__ = ["AttackConfig", "AttackResult", "ExposureReport", "attack_corpus", "attack_parameters",
           "format_markdown", "plot_privacy", "recover", "weight_exposure"]
