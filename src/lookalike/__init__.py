"""lookalike: visual product search. Point it at ``<catalog>/<product_id>/<images>``; ask which products look alike."""

from .embedding import FeatureExtractor
from .engine import BuildReport, ImageSearchEngine, IndexMismatchError, UnknownProductError
from .evaluation import EvaluationUtils
from .imaging import ImageError
from .settings import Settings, SettingsError
from .store import DataManager, IndexFileError

__version__ = "0.1.0"

__all__ = [
    "BuildReport",
    "DataManager",
    "EvaluationUtils",
    "FeatureExtractor",
    "ImageError",
    "ImageSearchEngine",
    "IndexFileError",
    "IndexMismatchError",
    "Settings",
    "SettingsError",
    "UnknownProductError",
    "__version__",
]
