"""fedspine.privacy: accounting, the per-site privacy ledger and cap checks.

Importing this package is cheap: Opacus and dp_accounting load on first use.
"""

from fedspine.privacy.accounting import (
    Mechanism,
    PrivacyAccountingError,
    calibrate_noise,
    default_delta,
    epsilon,
    epsilon_curve,
    plot_epsilon_curve,
)
from fedspine.privacy.ledger import CapDecision, LedgerError, PrivacyLedger

__all__ = [
    "CapDecision",
    "LedgerError",
    "Mechanism",
    "PrivacyAccountingError",
    "PrivacyLedger",
    "calibrate_noise",
    "default_delta",
    "epsilon",
    "epsilon_curve",
    "plot_epsilon_curve",
]
