"""The TFDS builder `ben_ge` (raw ben-ge -> array_record, TF-free) and its helpers.

Importing this package registers the builder with TFDS, so `tfds.data_source("ben_ge/NAME", ...)` finds it.
"""

from data_builders.ben_ge.ben_ge import BenGe, BenGeConfig, config_names, dataset_dir, prepare
from data_builders.ben_ge.reading import BenGeDataError
