"""Every call shown in the seed's spec (../shared/spec/ml-module.md) works as written, with ``lookalike`` for
``ml``. Settings come the seed's way, from ``configs/configs.yaml`` in the working directory; the tiny test backbone
stands in for the spec's resnet50, whose weights are beside the point here."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pytest

from conftest import PRODUCTS, product_image, write_catalog


@pytest.fixture
def seed_project(tmp_path, monkeypatch) -> Path:
    """A working directory laid out like the seed's deployment: configs/configs.yaml, data/, cache/."""
    for name in list(os.environ):
        if name.startswith("LOOKALIKE_"):
            monkeypatch.delenv(name)
    write_catalog(tmp_path / "data", PRODUCTS)
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "configs.yaml").write_text(
        "device: cpu\nbatch_size: 4\nmodel_name: test_tiny\nsimilarity_metric: cosine\n"
        f"data_dir: {tmp_path / 'data'}\ncache_dir: {tmp_path / 'cache'}\n"
    )
    monkeypatch.chdir(tmp_path)
    query = tmp_path / "query.jpg"
    product_image(0, 40).save(query)  # a new view of the first product, red-disc
    return tmp_path


def test_init_exports_the_four_classes():
    # from ml import DataManager, FeatureExtractor, ImageSearchEngine, EvaluationUtils
    from lookalike import DataManager, EvaluationUtils, FeatureExtractor, ImageSearchEngine

    assert all(callable(c) for c in (DataManager, FeatureExtractor, ImageSearchEngine, EvaluationUtils))


def test_building_loading_and_searching_as_the_spec_shows(seed_project, capsys):
    from lookalike import ImageSearchEngine

    # ### Building an Index
    engine = ImageSearchEngine()
    engine.build_index()  # Uses cached embeddings if available
    # or
    engine.build_index(force_rebuild=True)  # Force re-extraction

    # ### Loading Pre-built Index (Production)
    engine = ImageSearchEngine()
    engine.load_index()  # Loads from index_file and metadata_file paths

    # ### Searching
    results = engine.search(str(seed_project / "query.jpg"), top_k=5)

    for r in results:
        print(f"Product: {r['product_id']}, Similarity: {r['similarity']:.2f}")

    lines = capsys.readouterr().out.splitlines()
    assert 1 <= len(lines) <= 5
    assert lines[0].startswith("Product: red-disc, Similarity: ")
    stats = engine.get_statistics()
    assert isinstance(stats, dict) and stats  # def get_statistics(self) -> Dict[str, Any]


def test_feature_extractor_with_the_seeds_logger_argument(seed_project):
    from lookalike import FeatureExtractor

    logger = logging.getLogger("seed")
    extractor = FeatureExtractor(logger)  # def __init__(self, logger: logging.Logger)
    assert extractor.logger is logger
    paths = sorted(str(p) for p in (seed_project / "data").rglob("*.jpg"))
    one = extractor.extract_features(paths[0])  # def extract_features(self, image_path: str) -> np.ndarray
    many = extractor.extract_batch_features(paths)  # def extract_batch_features(self, image_paths) -> np.ndarray
    assert one.shape == (extractor.dim,) and many.shape == (len(paths), extractor.dim)
    assert one.dtype == np.float32
    np.testing.assert_allclose(many[0], one, rtol=1e-4, atol=1e-4)


def test_feature_extractor_keyword_logger_still_works(seed_project):
    from lookalike import FeatureExtractor, Settings

    logger = logging.getLogger("seed")
    assert FeatureExtractor(Settings(), logger=logger).logger is logger
    assert FeatureExtractor(logger=logger).logger is logger


def test_data_manager_as_the_spec_shows(seed_project):
    from lookalike import DataManager, FeatureExtractor, ImageSearchEngine

    manager = DataManager()
    image_paths, product_ids = manager.load_dataset()  # -> Tuple[List[str], List[str]]
    assert len(image_paths) == sum(PRODUCTS.values()) and sorted(set(product_ids)) == sorted(PRODUCTS)
    assert manager.load_embeddings() is None  # nothing cached yet
    embeddings = FeatureExtractor(logging.getLogger("seed")).extract_batch_features(image_paths)
    manager.save_embeddings(embeddings, image_paths, product_ids)
    loaded = manager.load_embeddings()  # -> Optional[Tuple[np.ndarray, List, List]]
    assert loaded is not None
    vectors, paths, products = loaded
    assert vectors.shape == embeddings.shape and list(products) == product_ids
    assert manager.load_metadata() is None  # no index built yet
    ImageSearchEngine().build_index()
    metadata = manager.load_metadata()  # -> Optional[Tuple[List[str], List[str]]]
    assert metadata is not None and sorted(metadata[1]) == sorted(product_ids)


def test_evaluation_utils_as_the_spec_shows():
    from lookalike import EvaluationUtils

    assert EvaluationUtils.calculate_precision_at_k("a", ["a", "b", "a"], 2) == 0.5
    assert EvaluationUtils.calculate_recall_at_k("a", ["b", "a"], 1) == 0.0
    assert EvaluationUtils.calculate_recall_at_k("a", ["b", "a"], 2) == 1.0


def test_l2_metric_from_the_spec_table(seed_project):
    from lookalike import ImageSearchEngine, Settings

    engine = ImageSearchEngine(Settings(similarity_metric="l2", cache_dir=seed_project / "cache-l2"))
    engine.build_index()
    assert engine.search(str(seed_project / "query.jpg"), top_k=5)[0]["product_id"] == "red-disc"
