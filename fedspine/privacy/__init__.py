"""fedspine.privacy: the privacy engine and the parts it is made of.

:class:`PrivacyEngine` is the façade every private computation spends budget through (plan,
write-ahead reserve, settle); the site's :class:`PrivacyHome` holds its :class:`PrivacyLedger`
and patient key; :mod:`.accounting` turns mechanisms into (ε, δ). See docs/DESIGN.md.

Importing this package is cheap: Opacus and dp_accounting load on first use.
"""

from fedspine.privacy.accounting import (
    CHECK_ACCOUNTANT,
    PLAN_ACCOUNTANT,
    REPORT_ACCOUNTANT,
    Mechanism,
    PrivacyAccountingError,
    calibrate_noise,
    epsilon,
    epsilon_curve,
    plot_epsilon_curve,
)
from fedspine.privacy.engine import (
    PrivacyCapExceeded,
    PrivacyEngine,
    PrivacyError,
    PrivacyPlan,
    Reservation,
    site_delta,
)
from fedspine.privacy.home import PrivacyHome, PrivacyHomeError, resolve_home
from fedspine.privacy.ledger import CapDecision, LedgerError, PrivacyLedger

__all__ = [
    "CHECK_ACCOUNTANT",
    "PLAN_ACCOUNTANT",
    "REPORT_ACCOUNTANT",
    "CapDecision",
    "LedgerError",
    "Mechanism",
    "PrivacyAccountingError",
    "PrivacyCapExceeded",
    "PrivacyEngine",
    "PrivacyError",
    "PrivacyHome",
    "PrivacyHomeError",
    "PrivacyLedger",
    "PrivacyPlan",
    "Reservation",
    "calibrate_noise",
    "epsilon",
    "epsilon_curve",
    "plot_epsilon_curve",
    "resolve_home",
    "site_delta",
]
