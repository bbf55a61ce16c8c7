"""The demo's job spec: built-in defaults (the text of examples/demo.toml) and what flags may change."""

from __future__ import annotations

from dataclasses import dataclass

# Rendered with DemoJob's fields; the defaults render examples/demo.toml byte for byte (a test
# checks), so the file documents exactly what `swarmtune demo` runs, and an installed copy needs no file.
TEMPLATE = """\
# The job `swarmtune demo` runs: builtin:tiny, pretrained to mediocre two-digit addition, improves
# by low-rank ES while the retention probe (string reversal) watches the skill it must keep.
#   swarmtune demo                      (embedded Redis, a coordinator and 2 workers on loopback)
#   swarmtune coordinator --job examples/demo.toml --open-enrollment    (the same job by hand)

[job]
id = "{job_id}"
seed = {seed}
model = "builtin:tiny"
iterations = {iterations}

[task]
name = "demo"
prompts_per_iteration = {prompts}
max_new_tokens = 8    # the longest answer (6 reversed letters) and its end token fit

[es]
population = {population}
sigma = 0.01
alpha = {alpha}
shaping = "zscore"
antithetic = true
anchored_decay = {anchored_decay}

[noise]
family = "lowrank"    # the whole population in one batched generation per worker
rank = 1
lowrank_others = "frozen"

[schedule]
deadline_seconds = 60
quorum = 1.0
redundancy = 1
attest_every = 10

[retention]
task = "demo-reverse"
every = {retention_every}
alert_threshold = 0.05
"""


@dataclass(frozen=True)
class DemoJob:
    """The demo job's adjustable settings; the defaults are what README figures are measured with."""

    iterations: int = 100
    population: int = 30
    prompts: int = 128
    seed: int = 2024
    alpha: float = 0.01
    anchored_decay: float = 0.0
    retention_every: int = 10
    job_id: str = "demo"

    def toml(self) -> str:
        """The job spec text (TOML); its exact bytes go in the ledger's genesis."""
        return TEMPLATE.format(
            job_id=self.job_id,
            seed=self.seed,
            iterations=self.iterations,
            prompts=self.prompts,
            population=self.population,
            alpha=repr(self.alpha),
            anchored_decay=repr(self.anchored_decay),
            retention_every=self.retention_every,
        )
