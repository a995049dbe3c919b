"""fedspine.release: the release gate. It stages a DP generator's synthetic data with its
privacy report, runs the steward's audits, refuses what the mechanism does not cover, and
signs. It sits above training, evaluation and the audits; nothing below imports it."""
