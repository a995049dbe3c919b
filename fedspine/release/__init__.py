"""fedspine.release: the release gate. It stages a DP generator's synthetic data with its
privacy report, runs the steward's audits, refuses what the mechanism does not cover, and
signs. It sits above training, evaluation and the audits; nothing below imports it.

:mod:`.gate` is the entry point (``make_release``) and re-exports the public names of the parts:
:mod:`.checks` (the privacy summary and the generator), :mod:`.coverage` (which audit set each
site trained on), :mod:`.memorisation_gate`, :mod:`.bundle` (what a release holds), :mod:`.utility` (the TSTR
verdict of an evaluation of the generator, stated, not gated) and :mod:`.errors`."""
