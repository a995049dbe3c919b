"""`fedspine release` and `fedspine verify`: the data steward's gated, signed release.

Shape::

    fedspine release RUN --out RELEASE --max-epsilon E --audit-data PREPARED [...]
                     --audit-dir STEWARD_AUDIT [--privacy-home HOME ...] [--key K]
                     [--evaluation EVAL]
    fedspine release keygen --out steward.key
    fedspine verify RELEASE [--public-key KEY]

``release`` is a group whose default command is ``make``: an argument that is not a subcommand
name is taken as RUN (``fedspine release make RUN ...`` is the same command spelled out).
Exit status: 0 released / verified, 3 refused by a privacy gate, 1 any other failure.

``--audit-dir`` (also spelled ``--steward-audit``) is required: the memorisation and membership
audits are computed on real images, so their figures go to that private folder and the release
only says which gates passed. ``--privacy-home`` (repeat it, one per site) names the sites'
privacy homes whose ledgers show which ``--audit-data`` set each site trained on; without it,
the one home ``--privacy-home``/``FEDSPINE_PRIVACY_HOME``/the default would find.

``--evaluation`` is the folder ``fedspine evaluate`` wrote for a synthetic set of this generator
against the real test split: the summary then states TSTR's verdict (its AUC and interval,
whether the interval excludes chance, the signal retained) and the privacy report records only
the verdict's category. Without it a warning says utility was not evaluated and how to evaluate;
an evaluation of another generator is refused before anything is written.
"""

from __future__ import annotations

from pathlib import Path

import typer
from typer.core import TyperGroup

EXIT_REFUSED = 3
EXIT_INTERRUPTED = 130
DEFAULT_KEY = Path("steward.key")


class _DefaultToMake(TyperGroup):
    """A group that runs ``make`` when the first argument is not one of its subcommands."""

    def parse_args(self, ctx, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and args[0] not in ("--help", "-h"):
            args = ["make", *args]
        return super().parse_args(ctx, args)


release_app = typer.Typer(
    cls=_DefaultToMake,
    no_args_is_help=True,
    add_completion=False,
    help=(
        "Release a synthetic dataset from a DP run: gated on the privacy ledger, the ε cap, the "
        "generator's binding to its privacy record and a memorisation audit, and signed. "
        "`fedspine release RUN --out RELEASE ...` makes one; "
        "`fedspine release keygen --out steward.key` creates the steward's signing key."
    ),
)


def register(app: typer.Typer) -> None:
    """Add `release` (group: make, keygen) and `verify` to the root app."""
    app.add_typer(release_app, name="release")
    app.command("verify")(verify_command)


@release_app.command("make")
def make_command(
    run: Path = typer.Argument(..., help="Run folder with generator.pt and privacy.json."),
    out: Path = typer.Option(..., "--out", help="Release folder to create (must not exist)."),
    max_epsilon: float = typer.Option(
        ..., "--max-epsilon", help="Refuse if any site's ε exceeds this."
    ),
    audit_data: list[Path] = typer.Option(
        ...,
        "--audit-data",
        help="Prepared dataset(s) the run was trained on: the memorisation and membership "
        "audits compare with their train and val/test splits. Repeat for several sites.",
    ),
    per_class: int = typer.Option(100, "--per-class", help="Synthetic images per class."),
    key: Path = typer.Option(
        DEFAULT_KEY, "--key", help="The steward's Ed25519 private key (from `release keygen`)."
    ),
    seed: int = typer.Option(0, "--seed", help="Random seed of the latents and noise."),
    truncation: float = typer.Option(1.0, "--truncation", help="Truncation psi (1 = none)."),
    percentile: float = typer.Option(
        1.0,
        "--memorisation-percentile",
        help="Memorisation threshold: this percentile of held-out images' distances to training.",
    ),
    steward_audit: Path = typer.Option(
        None,
        "--audit-dir",
        "--steward-audit",
        help="The steward's private audit folder (required): memorisation.json, "
        "membership.json and the closest synthetic/training pairs figure go there. They are "
        "computed on real images, so they are never part of the release; keep it private.",
    ),
    privacy_home: list[Path] = typer.Option(
        None,
        "--privacy-home",
        help="A site's privacy home (its ledger.json and site.key); repeat for several sites. "
        "Its ledger shows which --audit-data set the site trained on. Default: the one home "
        "FEDSPINE_PRIVACY_HOME or the default location names. A home without a ledger is "
        "skipped, never created.",
    ),
    evaluation: Path = typer.Option(
        None,
        "--evaluation",
        help="The folder `fedspine evaluate` wrote for a synthetic set of this generator "
        "against the real test split: the summary states TSTR's verdict and the privacy "
        "report records only its category (signal above chance, no evidence of signal, worse "
        "than chance). Refused if it judged another generator.",
    ),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda."),
) -> None:
    """Check, generate, audit and sign a synthetic-data release (nothing is written if refused)."""
    from fedspine.cli.common import fail, progress_bar
    from fedspine.privacy.home import resolve_home
    from fedspine.release.gate import (
        MemorisationGate,
        ReleaseError,
        ReleaseRefused,
        make_release,
    )
    from fedspine.training.gan_trainer import resolve_device

    if device not in ("auto", "cpu", "cuda"):
        fail(f"--device {device}: choose auto, cpu or cuda")
    try:
        dev = resolve_device(device)
        gate = MemorisationGate(percentile=percentile)
    except (RuntimeError, ValueError) as err:
        fail(str(err))
    progress = progress_bar()
    task = None

    def advance(n: int, total: int) -> None:
        nonlocal task
        if task is None:
            progress.start()
            task = progress.add_task("generate", total=total)
        progress.advance(task, n)

    try:
        result = make_release(
            run,
            out,
            max_epsilon=max_epsilon,
            per_class=per_class,
            audit_data=audit_data,
            signing_key=key,
            seed=seed,
            truncation=truncation,
            gate=gate,
            device=str(dev),
            steward_audit_dir=steward_audit,
            privacy_homes=list(privacy_home or []) or [resolve_home(None)],
            log=progress.console.print,
            advance=advance,
            evaluation=evaluation,
        )
    except KeyboardInterrupt:
        typer.echo(f"interrupted; nothing was written to {out}", err=True)
        raise typer.Exit(EXIT_INTERRUPTED) from None
    except ReleaseRefused as err:
        typer.echo(f"release refused: {err.reason}", err=True)
        raise typer.Exit(EXIT_REFUSED) from None
    except ReleaseError as err:
        fail(str(err))
    finally:
        progress.stop()
    for warning in result.warnings:
        typer.echo(f"warning: {warning}", err=True)
    eps = max(s["epsilon"] for s in result.sites.values())
    mem = result.memorisation
    typer.echo(
        f"released {out}: {result.files} files signed by {result.fingerprint}; "
        f"max site ε {eps:.3g} (cap {max_epsilon:g}); memorisation {mem.share_flagged:.1%} "
        f"flagged (allowed {mem.allowed_share:.1%}); membership AUC "
        f"{result.membership['nearest']['auc']:.3f}; these audit figures are in "
        f"{result.steward_audit} (private: not in the release)"
    )
    if result.utility.evaluated:
        typer.echo(result.utility.console_line(out))
    else:
        typer.echo(f"warning: {result.utility.console_line(out)}", err=True)


@release_app.command("keygen")
def keygen_command(
    out: Path = typer.Option(
        DEFAULT_KEY, "--out", help="Private key file to create; the public key goes to OUT.pub."
    ),
) -> None:
    """Create the steward's Ed25519 signing key (never overwrites an existing key)."""
    from fedspine.cli.common import fail
    from fedspine.privacy.signing import (
        SigningError,
        fingerprint,
        load_public_key,
        make_signing_key,
    )

    try:
        private, public = make_signing_key(out)
    except (SigningError, OSError) as err:
        fail(str(err))
    typer.echo(
        f"wrote {private} (private, keep it secret) and {public} "
        f"(publish it); fingerprint {fingerprint(load_public_key(public))}"
    )


def verify_command(
    release: Path = typer.Argument(..., help="Release folder to check."),
    public_key: Path = typer.Option(
        None,
        "--public-key",
        help="The steward's public key. Without it the key shipped in the release is used, "
        "which proves integrity but not origin.",
    ),
) -> None:
    """Check a release's signature and every file's SHA-256 against its manifest."""
    from fedspine.privacy.signing import verify_release

    result = verify_release(release, public_key)
    if not result.ok:
        typer.echo(f"release NOT verified: {len(result.problems)} problem(s)", err=True)
        for problem in result.problems:
            typer.echo(f"  {problem}", err=True)
        raise typer.Exit(1)
    for note in result.notes:
        typer.echo(f"note: {note}", err=True)
    typer.echo(f"release verified: {result.files} files, signed by {result.fingerprint}")
