"""The forms of the DP step's fine-tuning options, read the same way everywhere, without torch.

Also the feature maps a federation's DP mean-embedding round may ask of its sites
(``FEDERATED_FEATURES``): the server's config, every site and the benchmark read one list.

``trainable_d`` (which of D's parameters the DP step trains and privatises) and
``augment_views`` are checked by ``fedspine.training.dp.DPConfig``, by the CLI before any data is
read, by the server's own config (``fedspine.federated.federation_config``, which imports no
torch) and by every site on what the server asks. One parser here, so those checks cannot drift
apart. Like ``fedspine.fileio`` it imports nothing from fedspine, so every layer may use it.

Only the form is checked here; K of "top:K" against a network's blocks is checked where D is
known (``fedspine.training.dp.trainable_d_names``, the site's check of its network).
"""

from __future__ import annotations

TRAINABLE_ALL = "all"
"""Every parameter of D is trained and privatised (the default)."""
TRAINABLE_HEAD = "head"
"""Only D's projection head: the label mapping (``D.mapping``) and the epilogue's output layer
(``D.epilogue.out``), the only parameters after the epilogue's fc (the projection onto the
label's cmap has none)."""
TOP_PREFIX = "top:"
"""``top:K``: the K lowest-resolution stages of D (the 4x4 epilogue with the label mapping,
then the K - 1 blocks above it)."""
TRAINABLE_D_FORMS = "'all', 'head' or 'top:K' with K >= 1"
MAX_AUGMENT_VIEWS = 32
"""Most augmented views per image a DP step takes (K views cost K passes of D per image)."""
FEDERATED_FEATURES = ("rff", "public", "rff+public")
"""``[embedding] features``: pixel random Fourier features, the public checkpoint's D features
(DP-MEPF), or both."""

_MAX_K_DIGITS = 6


def trainable_d_problem(spec: object) -> str:
    """Why ``spec`` is not a ``trainable_d`` value, or "" when it is one."""
    if isinstance(spec, str):
        if spec in (TRAINABLE_ALL, TRAINABLE_HEAD):
            return ""
        count = spec.removeprefix(TOP_PREFIX)
        if (
            count != spec
            and count.isascii()
            and count.isdigit()
            and len(count) <= _MAX_K_DIGITS
            and int(count) >= 1
        ):
            return ""
    return (
        f"trainable_d must be {TRAINABLE_D_FORMS} (all of D; only D's projection head, the "
        "label mapping and the epilogue's output layer; or the K lowest-resolution stages of D, "
        f"the 4x4 epilogue with the label mapping, then blocks above it), not {str(spec)[:40]!r}"
    )


def top_stages(spec: object) -> int | None:
    """K of ``trainable_d`` = "top:K"; None for "all" and "head". Refuses any other value
    (ValueError)."""
    problem = trainable_d_problem(spec)
    if problem:
        raise ValueError(problem)
    text = str(spec)
    return int(text.removeprefix(TOP_PREFIX)) if text.startswith(TOP_PREFIX) else None


def names_public(features: str) -> bool:
    """Whether a feature spec uses the public network (``public``)."""
    return "public" in str(features).split("+")
