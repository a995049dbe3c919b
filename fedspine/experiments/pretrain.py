"""`fedspine pretrain`: a public checkpoint from fedspine's own phantom simulator (issue 15).

DP-SGD from scratch on a few hundred patients leaves no signal; DP fine-tuning from a public
checkpoint can keep some (../shared/reference/dp_utility.md). The phantom simulator is the
public corpus every user has: no patient is in it. This makes one large phantom population whose
seed, imaging chain and lesion prevalence are its own (a site made with `fedspine phantom` and
another seed is another hospital), ingests it, and trains on it with the data declared public
(``--public-data``) and, by default, D built as a DP run builds it (``--for-dp``). Its run folder
is then what `fedspine train --init-from` takes. Each step resumes: a folder already there is
kept (the phantom images, the prepared dataset) and a run is continued.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from fedspine.data.ingest import IngestConfig, ingest
from fedspine.data.phantom import SiteDomain, phantom_site_domains, write_phantom_site
from fedspine.fileio import RUN_LATEST, write_json_atomic
from fedspine.training.run import RunReporter, RunResult, TrainRequest, train

PRETRAIN_CONFIG = "pretrain.json"
PHANTOM_DIR = "phantom"
PREPARED_DIR = "prepared"
RUN_DIR = "run"
PUBLIC_SEED = 1000
"""The public corpus's default seed: the demo's and the tests' private sites use small seeds."""


@dataclass(frozen=True)
class PretrainConfig:
    """Every setting of a public pretraining; written to OUT/pretrain.json."""

    images: int = 2000
    seed: int = PUBLIC_SEED
    prevalence: float = 0.5
    size: int = 256
    resolution: int = 32
    preset: str = "cpu"
    kimg: float | None = None
    for_dp: bool = True
    device: str = "auto"
    workers: int = 1

    def declaration(self) -> str:
        """What the run records as the reason its data is public."""
        return (
            f"fedspine phantom simulator, public corpus of {self.images} images (seed "
            f"{self.seed}, abnormal prevalence {self.prevalence:g}); no patient data"
        )


def public_domain(seed: int, prevalence: float) -> SiteDomain:
    """The public corpus's domain: a phantom site of its own seed and the given prevalence."""
    if not 0.0 < prevalence < 1.0:
        raise ValueError(f"--prevalence {prevalence}: must be between 0 and 1")
    domain = phantom_site_domains(1, seed)[0]
    return dataclasses.replace(
        domain,
        name="public",
        institution="fedspine public phantom corpus",
        abnormal_prevalence=float(prevalence),
    )


def pretrain(
    out: str | Path,
    config: PretrainConfig | None = None,
    stage: Callable[[str], None] | None = None,
    reporter: RunReporter | None = None,
) -> RunResult:
    """Make (or continue) the public corpus and its checkpoint under ``out``; returns the run."""
    config = config or PretrainConfig()
    stage = stage or (lambda _msg: None)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / PRETRAIN_CONFIG, asdict(config))
    phantom, prepared, run = out / PHANTOM_DIR, out / PREPARED_DIR, out / RUN_DIR
    if not phantom.exists():
        stage(f"making the public phantom corpus: {config.images} images, seed {config.seed}")
        domain = public_domain(config.seed, config.prevalence)
        write_phantom_site(phantom, domain, config.images, size=config.size, seed=config.seed)
    if not prepared.exists():
        stage(f"ingesting it at {config.resolution} px")
        ingest(
            phantom,
            prepared,
            IngestConfig(resolution=config.resolution, seed=config.seed, workers=config.workers),
        )
    resume = (run / RUN_LATEST).is_file()
    stage(("continuing" if resume else "training") + f" the public checkpoint in {run}")
    request = TrainRequest(
        prepared,
        run,
        preset=None if resume else config.preset,
        kimg=config.kimg,
        resolution=None if resume else config.resolution,
        seed=None if resume else config.seed,
        resume=resume,
        device=config.device,
        public_data=None if resume else config.declaration(),
        for_dp=config.for_dp and not resume,
    )
    return train(request, reporter)
