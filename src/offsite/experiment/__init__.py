"""The experiment layer: what runs the protocol to measure it, never part of the protocol itself.

* :mod:`.run`: ``offsite run``, both parties on one machine, and the table's rows of one cell
  (:mod:`.cell`: the ordered rows, with an optional per-row cache, shared with ``bench/paper.py``);
* :mod:`.budget`: how much work a run does (``--preset``); :mod:`.benchmark`: what the scripts in
  ``bench/`` share; :mod:`.results` / :mod:`.report`: results files and the tables read from them;
  :mod:`.stats`: transfer and statistics over seeds; :mod:`.privacy`: ``offsite privacy``'s runs;
  :mod:`.federated`: the rows scored after a federation.

The dependency points one way: these modules import the protocol's (``offsite.bundle``,
``offsite.tune``, ``offsite.plug``, ``offsite.emulator``, ``offsite.assist``, ``offsite.harm``, ...),
which never import this package; only the command-line entries (``offsite.cli`` and the packages'
``cli`` modules) wire the two (tests/test_layers.py).
"""
