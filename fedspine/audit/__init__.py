"""fedspine.audit: empirical privacy audits that train or run models (membership inference on a
generator, the privacy engine's canary audit). They sit above training and evaluation, and
below the release gate that runs them for the data steward."""
