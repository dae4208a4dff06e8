"""hydra-submitit-launcher's SLURM launcher, with one change: a requeued job resumes.

On pre-emption or timeout submitit calls the job's `checkpoint()` and resubmits what it returns; the plugin returns
the same call with the same overrides, which would start the run over. Here the overrides get `resume=auto`, so
the requeued job continues in its own run dir from its last checkpoint (`conf/hydra/launcher/slurm*.yaml`).
"""
from __future__ import annotations

from hydra_plugins.hydra_submitit_launcher.submitit_launcher import SlurmLauncher


class ResumingSlurmLauncher(SlurmLauncher):
    def checkpoint(self, sweep_overrides, *args, **kwargs):
        overrides = [o for o in sweep_overrides if not o.lstrip("+").startswith("resume=")] + ["resume=auto"]
        return super().checkpoint(overrides, *args, **kwargs)
