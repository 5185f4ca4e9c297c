"""The ``study:`` block and a study's setup, re-exported from their home below study and report,
:mod:`dora_lab.plan` (the schema: :mod:`dora_lab.plan.space`; reading a study file:
:mod:`dora_lab.plan.setup`), so that ``from dora_lab.study.space import prepare`` keeps working."""

from ..plan.setup import StudySetup, check_scorer_params, parse_study, prepare, read_study_block, trial_config
from ..plan.space import CategoricalParam, FloatParam, IntParam, StudyConfig, db_url

__all__ = ["CategoricalParam", "FloatParam", "IntParam", "StudyConfig", "StudySetup", "check_scorer_params", "db_url",
           "parse_study", "prepare", "read_study_block", "trial_config"]
